//! Every figure of the report, drawn with `plotters` (SVG backend): test accuracy of ceilings
//! and students by model size, where the conflict tax is paid by strong model, the conflicts'
//! dose-response and the knowledge areas, as means over draws with 95 % t-interval error bars;
//! the no-conflict students' imitation DS against the capability gap; the policy-collapse
//! counts. Axis ticks come from
//! plotters' round-number tick placement; captions are wrapped inside the figure.

use std::collections::BTreeMap;

use plotters::prelude::*;

use crate::findings::SeedInterval;
use crate::report::{Comparison, Report, collapse_counts};
use crate::run_folder::{Dose, Role, Scenario, Setting, Variant};

/// Why a figure could not be drawn; the message goes into the figure's file instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DrawError(String);

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for DrawError {
    fn from(error: DrawingAreaErrorKind<E>) -> Self {
        Self(error.to_string())
    }
}

const WIDTH: u32 = 900;
const FONT: &str = "sans-serif";
const EXPLICIT: RGBColor = RGBColor(0x4C, 0x72, 0xB0);
const IMPLICIT: RGBColor = RGBColor(0xDD, 0x84, 0x52);
const REFUSE: RGBColor = RGBColor(0x55, 0xA8, 0x68);
const COMPLY: RGBColor = RGBColor(0xC4, 0x4E, 0x52);
const ANSWERS: RGBColor = RGBColor(0xBB, 0xBB, 0xBB);
/// Characters per caption line at the caption's font size in a `WIDTH`-wide figure.
const CAPTION_CHARS: usize = 150;

/// A tick label: the round value plotters chose, without float noise or a "-0".
pub fn tick_label(v: &f64) -> String {
    let text = format!("{v:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_string()
    } else {
        text.to_string()
    }
}

/// Words of `text` in lines of at most `width` characters.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// One point of a dose-response curve: the dose and the across-draw interval of the per-draw
/// mean over pairs.
#[derive(Debug, Clone)]
pub struct DosePoint {
    pub dose: f64,
    pub value: SeedInterval,
}

/// The dose of a conflict comparison: α (explicit) or helpfulness pairs (implicit).
fn dose(c: &Comparison) -> Option<f64> {
    c.variant.dose.map(Dose::value)
}

/// Per dose of `kind` (the explicit or implicit setting) in `scenario`: `value` averaged over the direct
/// students' comparisons of each draw, then mean and 95 % t-interval over draws.
pub fn dose_curve(
    report: &Report,
    scenario: Scenario,
    kind: Setting,
    value: fn(&Comparison) -> Option<f64>,
) -> Vec<DosePoint> {
    // dose (as bits, for ordering) → seed → values
    let mut by_dose: BTreeMap<u64, BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    for c in report.comparisons.iter().filter(|c| {
        c.scenario == scenario
            && c.setting == kind
            && c.baseline_run_id.is_some()
            && c.variant.is_plain()
    }) {
        let (Some(d), Some(v)) = (dose(c), value(c)) else {
            continue;
        };
        by_dose
            .entry(d.to_bits())
            .or_default()
            .entry(c.seed)
            .or_default()
            .push(v);
    }
    let mut points: Vec<DosePoint> = by_dose
        .into_iter()
        .filter_map(|(bits, seeds)| {
            let per_draw: Vec<f64> = seeds
                .values()
                .map(|v| v.iter().sum::<f64>() / v.len() as f64)
                .collect();
            Some(DosePoint {
                dose: f64::from_bits(bits),
                value: SeedInterval::of(&per_draw)?,
            })
        })
        .collect();
    points.sort_by(|a, b| a.dose.total_cmp(&b.dose));
    points
}

fn label_of(kind: &str, dose: f64) -> String {
    if kind == "explicit" {
        format!("α {dose}")
    } else {
        format!("h {dose}")
    }
}

type Curves = Vec<(&'static str, RGBColor, Vec<DosePoint>)>;
/// Each curve's points at their x positions.
type Placed<'a> = Vec<(&'a str, RGBColor, Vec<(f64, &'a DosePoint)>)>;
/// A panel's name and the per-comparison value it shows.
type Metric = (&'static str, fn(&Comparison) -> Option<f64>);

/// Draws one panel: categorical doses on x (explicit first, then implicit), means with error
/// bars on y, a line at 0.
fn draw_dose_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    curves: &Curves,
) -> Result<(), DrawError> {
    let mut labels: Vec<String> = Vec::new();
    let mut placed: Placed<'_> = Vec::new();
    for (kind, color, points) in curves {
        let mut xs = Vec::new();
        for p in points {
            xs.push((labels.len() as f64, p));
            labels.push(label_of(kind, p.dose));
        }
        placed.push((kind, *color, xs));
    }
    let bounds: Vec<f64> = placed
        .iter()
        .flat_map(|(_, _, xs)| {
            xs.iter().flat_map(|(_, p)| {
                let h = p.value.half_width.unwrap_or(0.0);
                [p.value.mean - h, p.value.mean + h]
            })
        })
        .chain([0.0])
        .collect();
    let lo = bounds.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = bounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.1).max(0.02);
    let n = labels.len().max(1);
    let draws: Vec<usize> = placed
        .iter()
        .flat_map(|(_, _, xs)| xs.iter().map(|(_, p)| p.value.seeds))
        .collect();
    let title = match (draws.iter().min(), draws.iter().max()) {
        (Some(a), Some(b)) if a == b => format!("{title} ({a} draws)"),
        (Some(a), Some(b)) => format!("{title} ({a}–{b} draws)"),
        _ => format!("{title} (no data)"),
    };
    let mut chart = categorical_chart(area, &title, &labels, (lo - pad)..(hi + pad), 6, None)?;
    chart.draw_series(LineSeries::new(
        [(-0.5, 0.0), (n as f64 - 0.5, 0.0)],
        BLACK.mix(0.4),
    ))?;
    for (_, color, xs) in &placed {
        let color = *color;
        chart.draw_series(LineSeries::new(
            xs.iter().map(|(x, p)| (*x, p.value.mean)),
            color.stroke_width(2),
        ))?;
        chart.draw_series(xs.iter().map(|(x, p)| {
            let h = p.value.half_width.unwrap_or(0.0);
            ErrorBar::new_vertical(
                *x,
                p.value.mean - h,
                p.value.mean,
                p.value.mean + h,
                color.filled(),
                8,
            )
        }))?;
    }
    Ok(())
}

/// A chart on `area` with the categories `labels` at x = 0, 1, …, y over `y_range`, round y
/// ticks (`y_ticks` of them), an optional y description, and `title` above.
fn categorical_chart<'a, 'b>(
    area: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    title: &str,
    labels: &[String],
    y_range: std::ops::Range<f64>,
    y_ticks: usize,
    y_desc: Option<&str>,
) -> Result<
    ChartContext<
        'a,
        SVGBackend<'b>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    DrawError,
> {
    let n = labels.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 15))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(48)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), y_range)?;
    let label_at = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            labels.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(n)
        .x_label_formatter(&label_at)
        .y_labels(y_ticks)
        .y_label_formatter(&tick_label)
        .label_style((FONT, 11));
    if let Some(desc) = y_desc {
        mesh.y_desc(desc);
    }
    mesh.draw()?;
    Ok(chart)
}

/// Draws `caption` wrapped into `area`, one line per 16 px.
fn draw_caption(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &[String],
) -> Result<(), DrawError> {
    for (i, line) in caption.iter().enumerate() {
        area.draw(&Text::new(
            line.clone(),
            (12, 6 + 16 * i as i32),
            (FONT, 12).into_font(),
        ))?;
    }
    Ok(())
}

/// A figure with a title, `panels` panels in a grid of `cols` columns and a wrapped caption;
/// `draw` fills panel `i`. Without panels the grid says there is nothing to draw.
fn figure(
    title: &str,
    caption: &str,
    panels: usize,
    cols: usize,
    panel_height: u32,
    mut draw: impl FnMut(
        usize,
        &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    ) -> Result<(), DrawError>,
) -> String {
    let cols = cols.max(1);
    let rows = panels.div_ceil(cols);
    let caption = wrap(caption, CAPTION_CHARS);
    let caption_height = 16 * caption.len() as u32 + 16;
    let height = 40 + panel_height * rows.max(1) as u32 + caption_height;
    let mut svg = String::new();
    let result = (|| -> Result<(), DrawError> {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, rest) = root.split_vertically(40);
        top.draw(&Text::new(
            title.to_string(),
            (WIDTH as i32 / 2, 12),
            (FONT, 17).into_font().into_text_style(&top).pos(
                plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Top,
                ),
            ),
        ))?;
        let (grid, bottom) = rest.split_vertically(panel_height * rows.max(1) as u32);
        if panels == 0 {
            grid.draw(&Text::new(
                "no data for this figure in these runs".to_string(),
                (12, 20),
                (FONT, 13).into_font(),
            ))?;
        }
        let areas = grid.split_evenly((rows.max(1), cols));
        for (i, panel) in areas.iter().enumerate().take(panels) {
            draw(i, panel)?;
        }
        draw_caption(&bottom, &caption)?;
        Ok(root.present()?)
    })();
    match result {
        Ok(()) => svg,
        // A figure that cannot be drawn still says why, in the file itself.
        Err(e) => format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"60\"><text x=\"10\" y=\"30\">figure not drawn: {}</text></svg>\n",
            e.to_string().replace('&', "&amp;").replace('<', "&lt;")
        ),
    }
}

/// The conflict tax and DS_new − chance against the dose, per scenario: means over draws of the
/// per-draw mean over pairs, with 95 % t-interval error bars.
pub fn dose_response_svg(report: &Report) -> String {
    let mut scenarios: Vec<Scenario> = report
        .comparisons
        .iter()
        .filter(|c| c.baseline_run_id.is_some())
        .map(|c| c.scenario)
        .collect();
    scenarios.sort();
    scenarios.dedup();
    let metrics: [Metric; 2] = [
        ("conflict tax", |c| c.conflict_tax),
        // As in the findings: only comparisons that carry evidence say where a tax is paid.
        ("DS_new − chance", |c| {
            c.no_evidence_reason()
                .is_none()
                .then_some(c.ds_new_excess)?
        }),
    ];
    let caption = "Each point: the mean over pretraining draws of the per-draw mean over weak < strong pairs \
        (direct students only); bars: 95% t-interval over draws. Conflict tax = accuracy of the \
        no-conflict student − accuracy of the conflict student (> 0: the conflict costs \
        harmlessness). DS_new − chance: share of the conflict's new mistakes in S_k ∩ W_uk above \
        its chance share (> 0: the tax falls where the weak teacher cannot see), on the \
        comparisons that carry evidence. Blue: the explicit conflict at weight α; orange: the \
        implicit conflict with h helpful pairs mixed in.";
    figure(
        "Dose-response of the conflicting goals",
        caption,
        2 * scenarios.len(),
        2,
        300,
        |i, area| {
            let scenario = scenarios[i / 2];
            let (metric, value) = metrics[i % 2];
            let curves: Curves = vec![
                (
                    "explicit",
                    EXPLICIT,
                    dose_curve(report, scenario, Setting::Explicit, value),
                ),
                (
                    "implicit",
                    IMPLICIT,
                    dose_curve(report, scenario, Setting::Implicit, value),
                ),
            ];
            draw_dose_panel(area, &format!("{scenario}: {metric}"), &curves)
        },
    )
}

/// Colours of the accuracy figure's series: the ceilings, then one per weak teacher.
const SERIES: [RGBColor; 7] = [
    RGBColor(0x33, 0x33, 0x33),
    RGBColor(0x4C, 0x72, 0xB0),
    RGBColor(0xDD, 0x84, 0x52),
    RGBColor(0x55, 0xA8, 0x68),
    RGBColor(0xC4, 0x4E, 0x52),
    RGBColor(0x81, 0x72, 0xB3),
    RGBColor(0x93, 0x78, 0x60),
];

/// One line of the accuracy figure: per model (x position), the across-draw interval.
type AccuracyLine = (String, RGBColor, Vec<(usize, SeedInterval)>);

/// The accuracy lines of one scenario: the ceilings by model, and the no-conflict
/// weak-to-strong students of each weak teacher by their strong model; means over seeds.
fn accuracy_lines(report: &Report, scenario: Scenario, models: &[String]) -> Vec<AccuracyLine> {
    let position = |model: &str| models.iter().position(|m| m == model);
    // (series, model position) → accuracies over seeds
    let mut values: BTreeMap<(Option<String>, usize), Vec<f64>> = BTreeMap::new();
    for run in report.runs.iter().filter(|r| r.scenario == scenario) {
        let Some(x) = position(&run.model) else {
            continue;
        };
        let series = if run.role.is_ceiling() {
            None
        } else if run.role == Role::W2s && run.variant == Variant::NONE {
            Some(run.weak_model.clone().unwrap_or_default())
        } else {
            continue;
        };
        values.entry((series, x)).or_default().push(run.accuracy);
    }
    let mut lines: Vec<AccuracyLine> = Vec::new();
    let mut series: Vec<Option<String>> = values.keys().map(|(s, _)| s.clone()).collect();
    series.dedup();
    // Ceilings first, then the teachers from the smallest.
    series.sort_by_key(|s| s.as_ref().map(|w| position(w).unwrap_or(usize::MAX)));
    for (i, name) in series.iter().enumerate() {
        let points: Vec<(usize, SeedInterval)> = values
            .iter()
            .filter(|((s, _), _)| s == name)
            .filter_map(|((_, x), v)| Some((*x, SeedInterval::of(v)?)))
            .collect();
        let label = match name {
            None => "ceiling (ground truth)".to_string(),
            Some(weak) => format!("student of {weak}"),
        };
        lines.push((label, SERIES[i % SERIES.len()], points));
    }
    lines
}

/// The accuracy axis: from 0.3, lower when an error bar reaches below it (to the next 0.1).
fn accuracy_floor(lines: &[AccuracyLine]) -> f64 {
    let lowest = lines
        .iter()
        .flat_map(|(_, _, points)| {
            points
                .iter()
                .map(|(_, v)| v.mean - v.half_width.unwrap_or(0.0))
        })
        .fold(0.3f64, f64::min);
    ((lowest * 10.0).floor() / 10.0).max(0.0)
}

/// Test accuracy against model size, one panel per scenario: the ceilings and the no-conflict
/// weak-to-strong students (one line per weak teacher), means over seeds with 95 % t-interval
/// error bars, chance at 0.5. Every run's own accuracy and CI are in report.md and report.csv.
pub fn accuracy_svg(report: &Report) -> String {
    let mut scenarios: Vec<Scenario> = report.runs.iter().map(|r| r.scenario).collect();
    scenarios.sort();
    scenarios.dedup();
    let mut models = crate::findings::model_order(report);
    for run in &report.runs {
        if !models.contains(&run.model) {
            models.push(run.model.clone());
        }
    }
    let seeds = report
        .runs
        .iter()
        .map(|r| r.seed)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let caption = format!(
        "Test accuracy by model (x, smallest first). Black: the model fine-tuned on ground truth \
         (its ceiling); coloured: the weak-to-strong student of each weak teacher without a \
         conflict, at its strong model. Points: means over {seeds} seed(s); bars: 95% t-interval \
         over seeds. Dashed: chance (0.5). Conflict students are in dose_response.svg, every \
         run's own accuracy and bootstrap CI in report.md."
    );
    figure(
        "Test accuracy: ceilings and weak-to-strong students",
        &caption,
        scenarios.len(),
        1,
        340,
        |i, area| {
            let lines = accuracy_lines(report, scenarios[i], &models);
            let axis = YAxis {
                range: Some((accuracy_floor(&lines), 1.0)),
                reference: 0.5,
                label: "test accuracy",
            };
            draw_by_model_panel(area, &scenarios[i].to_string(), &models, &lines, &axis)
        },
    )
}

/// How a by-model panel's y axis is laid out.
struct YAxis {
    /// The range, or `None` to fit the data (and the reference line) with a margin.
    range: Option<(f64, f64)>,
    /// A dashed reference line (chance, or zero).
    reference: f64,
    label: &'static str,
}

/// One panel with models on x and one line per series, each point a mean with its 95 %
/// t-interval; series sit side by side around each model so their bars do not overlap; a legend
/// on the right.
fn draw_by_model_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    models: &[String],
    lines: &[AccuracyLine],
    axis: &YAxis,
) -> Result<(), DrawError> {
    let n = models.len().max(1);
    // The legend takes the panel's right edge: wider in a one-column figure.
    let width = area.dim_in_pixel().0;
    let legend_width = if width > 600 { 210 } else { 115 };
    let (area, legend) = area.split_horizontally(width.saturating_sub(legend_width));
    let ends = lines.iter().flat_map(|(_, _, points)| {
        points.iter().flat_map(|(_, v)| {
            let h = v.half_width.unwrap_or(0.0);
            [v.mean - h, v.mean + h]
        })
    });
    let (lo, hi) = match axis.range {
        Some(range) => range,
        None => {
            let (lo, hi) = ends
                .chain([axis.reference])
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                    (a.min(v), b.max(v))
                });
            let pad = ((hi - lo) * 0.1).max(0.02);
            (lo - pad, hi + pad)
        }
    };
    let mut chart = categorical_chart(&area, title, models, lo..hi, 8, Some(axis.label))?;
    chart.draw_series(DashedLineSeries::new(
        [(-0.5, axis.reference), (n as f64 - 0.5, axis.reference)],
        6,
        4,
        BLACK.mix(0.5).into(),
    ))?;
    let spread = 0.5 / lines.len().max(1) as f64;
    for (k, (_, color, points)) in lines.iter().enumerate() {
        let offset = (k as f64 - (lines.len() as f64 - 1.0) / 2.0) * spread;
        let at = |x: usize| x as f64 + offset;
        let color = *color;
        chart.draw_series(LineSeries::new(
            points.iter().map(|(x, v)| (at(*x), v.mean)),
            color.stroke_width(2),
        ))?;
        chart.draw_series(points.iter().map(|(x, v)| {
            let h = v.half_width.unwrap_or(0.0);
            ErrorBar::new_vertical(at(*x), v.mean - h, v.mean, v.mean + h, color.filled(), 6)
        }))?;
    }
    draw_legend(
        &legend,
        lines
            .iter()
            .map(|(label, color, _)| (label.as_str(), *color)),
    )
}

/// A legend down `area`: one colour swatch and label per entry.
fn draw_legend<'l>(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    entries: impl Iterator<Item = (&'l str, RGBColor)>,
) -> Result<(), DrawError> {
    for (k, (label, color)) in entries.enumerate() {
        let y = 40 + 18 * k as i32;
        area.draw(&Rectangle::new([(4, y - 5), (18, y + 5)], color.filled()))?;
        area.draw(&Text::new(
            label.to_string(),
            (24, y - 6),
            (FONT, 12).into_font(),
        ))?;
    }
    Ok(())
}

/// The strongest dose of each conflict kind in each scenario: (scenario, variant) pairs.
fn strongest_doses(report: &Report) -> Vec<(Scenario, Variant)> {
    let mut best: BTreeMap<(Scenario, Setting), (f64, Variant)> = BTreeMap::new();
    for c in report
        .comparisons
        .iter()
        .filter(|c| c.baseline_run_id.is_some() && c.variant.is_plain())
    {
        let Some(d) = dose(c) else { continue };
        let entry = best
            .entry((c.scenario, c.setting))
            .or_insert((f64::NEG_INFINITY, Variant::NONE));
        if d > entry.0 {
            *entry = (d, c.variant.clone());
        }
    }
    best.into_iter()
        .map(|((scenario, _), (_, variant))| (scenario, variant))
        .collect()
}

/// One across-seeds interval of a comparison row (its tax, DS_new − chance, ΔDS, …).
type Interval = fn(&crate::findings::AcrossSeeds) -> Option<SeedInterval>;

/// Per weak teacher: `value`'s interval over seeds at each strong model, for one scenario and
/// conflict variant (direct students).
fn by_strong_model(
    report: &Report,
    scenario: Scenario,
    variant: &Variant,
    models: &[String],
    value: Interval,
) -> Vec<AccuracyLine> {
    let rows = crate::findings::across_seeds(report);
    let mut lines = Vec::new();
    for (i, weak) in models.iter().enumerate() {
        let points: Vec<(usize, SeedInterval)> = rows
            .iter()
            .filter(|r| r.scenario == scenario && r.variant == *variant && &r.weak == weak)
            .filter_map(|r| Some((models.iter().position(|m| *m == r.strong)?, value(r)?)))
            .collect();
        if !points.is_empty() {
            lines.push((
                format!("weak {weak}"),
                SERIES[(i + 1) % SERIES.len()],
                points,
            ));
        }
    }
    lines
}

/// Where the conflict tax is paid, by strong model, at the strongest dose of each conflict:
/// DS_new − chance and ΔDS, one line per weak teacher, means over seeds with 95 % t-interval
/// error bars.
pub fn deception_vs_size_svg(report: &Report) -> String {
    let models = crate::findings::model_order(report);
    let panels = strongest_doses(report);
    let caption = "x: the strong model (smallest first); one line per weak teacher. Left: DS_new − \
        chance, the share of the conflict's new mistakes that lie in S_k ∩ W_uk above its chance \
        share (> 0: the tax falls where the weak teacher cannot see; only comparisons that carry \
        evidence). Right: ΔDS = DS(conflict) − DS(no conflict). Points: means over seeds; bars: \
        95% t-interval over seeds. The strongest dose of each conflict; every dose is in \
        dose_response.svg, every comparison in report.md.";
    figure(
        "Where the conflict tax is paid, by strong model",
        caption,
        2 * panels.len(),
        2,
        280,
        |i, area| {
            let (scenario, variant) = &panels[i / 2];
            let (name, value): (&'static str, Interval) = if i % 2 == 0 {
                ("DS_new − chance", |r| r.ds_new_excess)
            } else {
                ("ΔDS", |r| r.ds_delta)
            };
            let axis = YAxis {
                range: None,
                reference: 0.0,
                label: name,
            };
            let lines = by_strong_model(report, *scenario, variant, &models, value);
            draw_by_model_panel(
                area,
                &format!("{scenario} {variant}: {name}"),
                &models,
                &lines,
                &axis,
            )
        },
    )
}

/// The four knowledge areas, in `region_table`'s cell order, with their colours.
const AREAS: [(&str, RGBColor); 4] = [
    ("W_k ∩ S_k", RGBColor(0x55, 0xA8, 0x68)),
    ("W_k ∩ S_uk", RGBColor(0x93, 0x78, 0x60)),
    ("W_uk ∩ S_k", RGBColor(0xC4, 0x4E, 0x52)),
    ("W_uk ∩ S_uk", RGBColor(0xBB, 0xBB, 0xBB)),
];

/// Per scenario, per weak → strong pair: each knowledge area's share of the test pairs, as the
/// across-seed interval of the per-seed shares. `(labels, per area: points (pair index, interval))`.
fn region_shares(
    report: &Report,
    scenario: Scenario,
) -> (Vec<String>, Vec<Vec<(usize, SeedInterval)>>) {
    let order = crate::findings::model_order(report);
    let rank = |m: &str| order.iter().position(|o| o == m).unwrap_or(usize::MAX);
    let mut pairs: Vec<(String, String)> = report
        .regions
        .iter()
        .filter(|r| r.scenario == scenario)
        .map(|r| (r.weak.clone(), r.strong.clone()))
        .collect();
    pairs.sort_by_key(|(w, s)| (rank(w), rank(s)));
    pairs.dedup();
    let mut areas = vec![Vec::new(); AREAS.len()];
    for (i, (weak, strong)) in pairs.iter().enumerate() {
        let tables: Vec<_> = report
            .regions
            .iter()
            .filter(|r| r.scenario == scenario && &r.weak == weak && &r.strong == strong)
            .collect();
        for (k, points) in areas.iter_mut().enumerate() {
            let shares: Vec<f64> = tables
                .iter()
                .filter_map(|t| {
                    let total: usize = t.cells.iter().map(|c| c.pairs).sum();
                    let cell = t.cells.get(k)?;
                    (total > 0).then(|| cell.pairs as f64 / total as f64)
                })
                .collect();
            if let Some(v) = SeedInterval::of(&shares) {
                points.push((i, v));
            }
        }
    }
    let labels = pairs.iter().map(|(w, s)| format!("{w} → {s}")).collect();
    (labels, areas)
}

/// The knowledge areas of every weak → strong pair, one panel per scenario: the share of test
/// pairs each area holds (the weak and strong ceilings' knowledge), means over seeds with 95 %
/// t-interval error bars. Where the students' mistakes fall, per seed, is in report.md.
pub fn regions_svg(report: &Report) -> String {
    let mut scenarios: Vec<Scenario> = report.regions.iter().map(|r| r.scenario).collect();
    scenarios.sort();
    scenarios.dedup();
    let caption = "Share of the test pairs in each knowledge area of a weak → strong pair: known \
        (k) or unknown (uk) to the weak (W) and the strong (S) ceiling. Red, W_uk ∩ S_k, is where \
        only the strong model knows the answer: where deception would hide. Bars: means over \
        seeds; error bars: 95% t-interval over seeds. The students' mistakes per area and seed \
        are in report.md.";
    figure(
        "Knowledge areas of each weak → strong pair",
        caption,
        scenarios.len(),
        1,
        320,
        |i, area| {
            let (labels, areas) = region_shares(report, scenarios[i]);
            let (plot, legend) = area.split_horizontally(WIDTH - 150);
            let mut chart = categorical_chart(
                &plot,
                &scenarios[i].to_string(),
                &labels,
                0.0..1.0,
                6,
                Some("share of test pairs"),
            )?;
            let width = 0.8 / AREAS.len() as f64;
            for (k, ((_, color), points)) in AREAS.iter().zip(&areas).enumerate() {
                let left = |x: usize| x as f64 - 0.4 + k as f64 * width;
                chart.draw_series(points.iter().map(|(x, v)| {
                    Rectangle::new(
                        [(left(*x), 0.0), (left(*x) + width * 0.9, v.mean)],
                        color.filled(),
                    )
                }))?;
                chart.draw_series(points.iter().map(|(x, v)| {
                    let h = v.half_width.unwrap_or(0.0);
                    let mid = left(*x) + width * 0.45;
                    ErrorBar::new_vertical(mid, v.mean - h, v.mean, v.mean + h, BLACK.filled(), 4)
                }))?;
            }
            draw_legend(&legend, AREAS.iter().copied())
        },
    )
}

/// No-conflict students, one panel per scenario: the DS of each comparison (filled, with its
/// bootstrap 95 % CI) and its chance share (hollow) against the capability gap (strong − weak
/// ceiling accuracy). This DS measures how much a student copies its teacher's mistakes.
pub fn ds_vs_gap_svg(report: &Report) -> String {
    let rows: Vec<&Comparison> = report
        .comparisons
        .iter()
        .filter(|c| c.baseline_run_id.is_none())
        .collect();
    let mut scenarios: Vec<Scenario> = rows.iter().map(|c| c.scenario).collect();
    scenarios.sort();
    scenarios.dedup();
    let caption = "Each no-conflict comparison (one per weak → strong pair and seed): filled, the \
        share of the student's mistakes inside S_k that lie in W_uk (the imitation DS), with its \
        bootstrap 95% CI; hollow, the share of W_uk in S_k (its chance). Above chance: the student \
        copies its teacher's errors, failed weak-to-strong generalization, not deception. x: \
        strong − weak ceiling accuracy. Colours: the student variant.";
    figure(
        "No-conflict students: imitation of the teacher's errors against the capability gap",
        caption,
        scenarios.len(),
        1,
        320,
        |i, area| {
            let panel: Vec<&&Comparison> =
                rows.iter().filter(|c| c.scenario == scenarios[i]).collect();
            let mut variants: Vec<&Variant> = panel.iter().map(|c| &c.variant).collect();
            variants.sort();
            variants.dedup();
            let (lo, hi) = panel
                .iter()
                .map(|c| c.capability_gap)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), g| {
                    (a.min(g), b.max(g))
                });
            let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 0.1) };
            let pad = ((hi - lo) * 0.1).max(0.02);
            let (plot, legend) = area.split_horizontally(WIDTH - 150);
            let mut chart = ChartBuilder::on(&plot)
                .caption(scenarios[i].to_string(), (FONT, 15))
                .margin(8)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d((lo - pad)..(hi + pad), 0.0f64..1.0)?;
            chart
                .configure_mesh()
                .light_line_style(TRANSPARENT)
                .x_labels(6)
                .x_label_formatter(&tick_label)
                .y_labels(6)
                .y_label_formatter(&tick_label)
                .x_desc("capability gap (strong − weak ceiling accuracy)")
                .y_desc("DS")
                .label_style((FONT, 11))
                .draw()?;
            for (k, variant) in variants.iter().enumerate() {
                let color = SERIES[(k + 1) % SERIES.len()];
                let points: Vec<&&&Comparison> =
                    panel.iter().filter(|c| &c.variant == *variant).collect();
                chart.draw_series(points.iter().filter_map(|c| {
                    Some(Circle::new(
                        (c.capability_gap, c.ds_chance?),
                        4,
                        color.stroke_width(2),
                    ))
                }))?;
                chart.draw_series(points.iter().filter_map(|c| {
                    let ds = c.ds?;
                    let (l, h) = c.ds_ci95.unwrap_or((ds, ds));
                    Some(ErrorBar::new_vertical(
                        c.capability_gap,
                        l,
                        ds,
                        h,
                        color.filled(),
                        4,
                    ))
                }))?;
                chart.draw_series(points.iter().filter_map(|c| {
                    Some(Circle::new((c.capability_gap, c.ds?), 4, color.filled()))
                }))?;
            }
            let colours = (0..variants.len()).map(|k| SERIES[(k + 1) % SERIES.len()]);
            let names: Vec<String> = variants.iter().map(|v| v.to_string()).collect();
            draw_legend(&legend, names.iter().map(String::as_str).zip(colours))
        },
    )
}

/// On-policy loops round by round (colours from [`SERIES`]): one panel per quantity (judge reward, right decisions,
/// harmful compliance, false statements), one curve per (role, variant), means over draws with
/// 95 % t-interval error bars.
pub fn rounds_svg(report: &Report) -> String {
    type Pick = fn(&crate::rounds::RoundPoint) -> Option<SeedInterval>;
    let panels: [(&str, Pick); 4] = [
        ("judge reward of the samples", |p| p.judge_reward),
        ("right decisions", |p| p.right_decision),
        ("harmful compliance", |p| p.harmful_compliance),
        ("false statements", |p| p.false_statement),
    ];
    let curves = &report.rounds;
    let rounds = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.round))
        .max()
        .map_or(0, |r| r as usize + 1);
    let labels: Vec<String> = (0..rounds)
        .map(|r| {
            if r == 0 {
                "SFT".into()
            } else {
                format!("round {r}")
            }
        })
        .collect();
    let names: Vec<String> = curves
        .iter()
        .map(|c| {
            if c.role == Role::GtJudged && c.variant == Variant::NONE {
                // Short enough for the legend column.
                "gt-judged ceiling".to_string()
            } else {
                format!("{} {}", c.role, c.variant)
            }
        })
        .collect();
    // The loop's ceiling in the dark first colour; the students in the others, in turn.
    let colors: Vec<RGBColor> = curves
        .iter()
        .scan(0, |student, c| {
            Some(if c.role == Role::GtJudged {
                SERIES[0]
            } else {
                *student += 1;
                SERIES[1 + (*student - 1) % (SERIES.len() - 1)]
            })
        })
        .collect();
    let caption = "The on-policy policy's samples on the loop's prompts after each round of DPO \
        against the judge (round 0: after SFT; the last point: the final policy). gt-judged \
        ceiling: the loop's ceiling, the strong model as its own teacher and ground-truth judge. Judge reward: \
        the judge alone, without a conflict's term, on each judge's own scale (the weak and the \
        strong reward model differ): compare it along a curve, not across roles. Rates: each draw pools its pairs; means over \
        draws with 95% t-interval error bars. The final policy's greedy answers to the test \
        prompts are graded in report.md (\"What the policies say\").";
    figure(
        "On-policy loops round by round",
        caption,
        if curves.is_empty() { 0 } else { panels.len() },
        2,
        300,
        |i, area| {
            let (name, pick) = panels[i];
            let series: Vec<Vec<(f64, SeedInterval)>> = curves
                .iter()
                .map(|c| {
                    c.points
                        .iter()
                        .filter_map(|p| Some((p.round as f64, pick(p)?)))
                        .collect()
                })
                .collect();
            let bounds: Vec<f64> = series
                .iter()
                .flatten()
                .flat_map(|(_, v)| {
                    let h = v.half_width.unwrap_or(0.0);
                    [v.mean - h, v.mean + h]
                })
                .collect();
            if bounds.is_empty() {
                area.draw(&Text::new(
                    format!("{name}: not graded in these runs"),
                    (12, 20),
                    (FONT, 13).into_font(),
                ))?;
                return Ok(());
            }
            let lo = bounds.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = bounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let pad = ((hi - lo) * 0.1).max(0.02);
            let (plot, legend) = area.split_horizontally(WIDTH / 2 - 130);
            let mut chart =
                categorical_chart(&plot, name, &labels, (lo - pad)..(hi + pad), 6, None)?;
            for (k, points) in series.iter().enumerate() {
                let color = colors[k];
                // Curves side by side within a round, so their error bars do not overlap.
                let shift = (k as f64 - (series.len() as f64 - 1.0) / 2.0) * 0.06;
                chart.draw_series(LineSeries::new(
                    points.iter().map(|(x, v)| (x + shift, v.mean)),
                    color.stroke_width(2),
                ))?;
                chart.draw_series(points.iter().map(|(x, v)| {
                    let h = v.half_width.unwrap_or(0.0);
                    ErrorBar::new_vertical(
                        x + shift,
                        v.mean - h,
                        v.mean,
                        v.mean + h,
                        color.filled(),
                        6,
                    )
                }))?;
            }
            draw_legend(
                &legend,
                names.iter().map(String::as_str).zip(colors.iter().copied()),
            )
        },
    )
}

/// Stacked bars per scenario: how many runs of each kind and setting comply always, refuse
/// always, or neither.
pub fn collapse_svg(report: &Report) -> String {
    let counts = collapse_counts(report);
    let mut scenarios: Vec<Scenario> = counts.keys().map(|(s, _, _)| *s).collect();
    scenarios.sort();
    scenarios.dedup();
    let caption = format!(
        "Runs per kind and setting (bar length = runs). Red: prefers the compliant response on ≥ {:.0}% \
         of the test pairs (always comply); green: on ≤ {:.0}% (always refuse); grey: answers the pairs. \
         A collapsed run's mistakes carry no evidence; its comparisons are left out of the findings.",
        crate::collapse::COLLAPSE_THRESHOLD * 100.0,
        (1.0 - crate::collapse::COLLAPSE_THRESHOLD) * 100.0
    );
    let rows_per: Vec<Vec<(String, [usize; 3])>> = scenarios
        .iter()
        .map(|s| {
            counts
                .iter()
                .filter(|((sc, _, _), _)| sc == s)
                .map(|((_, kind, setting), c)| (format!("{kind} {setting}"), *c))
                .collect()
        })
        .collect();
    let most = rows_per.iter().map(Vec::len).max().unwrap_or(1).max(1) as u32;
    figure(
        "Policy collapse: runs that answer every pair the same way",
        &caption,
        scenarios.len(),
        1,
        40 + 22 * most,
        |i, area| {
            let rows = &rows_per[i];
            let max = rows.iter().map(|(_, c)| c[0]).max().unwrap_or(1).max(1);
            let n = rows.len().max(1);
            let mut chart = ChartBuilder::on(area)
                .caption(scenarios[i].to_string(), (FONT, 15))
                .margin(8)
                .x_label_area_size(24)
                .y_label_area_size(190)
                .build_cartesian_2d(0f64..max as f64 * 1.05, -0.5f64..(n as f64 - 0.5))?;
            let label_at = |y: &f64| {
                let k = y.round();
                if (y - k).abs() < 1e-6 && k >= 0.0 {
                    rows.get(k as usize)
                        .map(|r| r.0.clone())
                        .unwrap_or_default()
                } else {
                    String::new()
                }
            };
            chart
                .configure_mesh()
                .disable_y_mesh()
                .light_line_style(TRANSPARENT)
                .y_labels(n)
                .y_label_formatter(&label_at)
                .x_labels(8)
                .x_label_formatter(&tick_label)
                .label_style((FONT, 11))
                .draw()?;
            let bar = |y: usize, from: usize, to: usize, color: RGBColor| {
                Rectangle::new(
                    [(from as f64, y as f64 - 0.35), (to as f64, y as f64 + 0.35)],
                    color.filled(),
                )
            };
            chart.draw_series(rows.iter().enumerate().flat_map(|(y, (_, c))| {
                let comply = c[1];
                let refuse = c[2];
                [
                    bar(y, 0, comply, COMPLY),
                    bar(y, comply, comply + refuse, REFUSE),
                    bar(y, comply + refuse, c[0], ANSWERS),
                ]
            }))?;
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dose_point_is_the_interval_over_draws_of_each_draws_mean_over_pairs() {
        use crate::run_folder::Setting;
        use crate::test_support::{predictions, report_of, run};
        let right = |wrong: usize| predictions(20, |i| i < wrong);
        let mut runs = Vec::new();
        // Seed 0: the conflict student loses 2 of 20 pairs (tax 0.1), seed 1: 4 (tax 0.2).
        for (seed, lost) in [(0u64, 2usize), (1, 4)] {
            runs.push(run(
                &format!("w{seed}"),
                "w",
                None,
                Setting::None,
                seed,
                right(10),
            ));
            runs.push(run(
                &format!("s{seed}"),
                "s",
                None,
                Setting::None,
                seed,
                right(0),
            ));
            runs.push(run(
                &format!("n{seed}"),
                "s",
                Some("w"),
                Setting::None,
                seed,
                right(0),
            ));
            runs.push(run(
                &format!("e{seed}"),
                "s",
                Some("w"),
                Setting::Explicit,
                seed,
                right(lost),
            ));
        }
        let report = report_of(&runs);
        let curve = dose_curve(&report, Scenario::Reward, Setting::Explicit, |c| {
            c.conflict_tax
        });
        assert_eq!(curve.len(), 1);
        assert_eq!(curve[0].dose, 0.5);
        let expected = SeedInterval::of(&[0.1, 0.2]).unwrap();
        assert_eq!(curve[0].value.seeds, 2);
        assert!((curve[0].value.mean - expected.mean).abs() < 1e-12);
        assert!((curve[0].value.half_width.unwrap() - expected.half_width.unwrap()).abs() < 1e-12);
        assert!(
            dose_curve(&report, Scenario::Reward, Setting::Implicit, |c| c
                .conflict_tax)
            .is_empty()
        );
        // The figure draws (an SVG with both panels' titles), not the fallback.
        let svg = dose_response_svg(&report);
        assert!(svg.contains("reward: conflict tax (2 draws)"), "{svg}");
        assert!(!svg.contains("figure not drawn"));
        let collapse = collapse_svg(&report);
        assert!(!collapse.contains("figure not drawn"));
        // Accuracy: the ceilings over both models, the no-conflict student at its strong one;
        // the conflict students are not drawn there.
        let models = vec!["w".to_string(), "s".to_string()];
        let lines = accuracy_lines(&report, Scenario::Reward, &models);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0].0, "ceiling (ground truth)");
        let ceiling: Vec<(usize, f64)> = lines[0].2.iter().map(|(x, v)| (*x, v.mean)).collect();
        assert_eq!(ceiling, [(0, 0.5), (1, 1.0)]);
        assert_eq!(lines[1].0, "student of w");
        assert_eq!(lines[1].2.len(), 1);
        assert_eq!((lines[1].2[0].0, lines[1].2[0].1.seeds), (1, 2));
        let svg = accuracy_svg(&report);
        assert!(
            svg.contains("student of w") && !svg.contains("figure not drawn"),
            "{svg}"
        );
        // Deception by size: the one conflict's strongest dose, one line for the weak teacher.
        let doses = strongest_doses(&report);
        assert_eq!(doses.len(), 1);
        assert_eq!(doses[0].0, Scenario::Reward);
        assert_eq!(doses[0].1.to_string(), "explicit α=0.5");
        let taxes = by_strong_model(&report, Scenario::Reward, &doses[0].1, &models, |r| r.tax);
        assert_eq!(taxes.len(), 1);
        assert_eq!(taxes[0].2.len(), 1);
        assert!((taxes[0].2[0].1.mean - 0.15).abs() < 1e-12, "{taxes:?}");
        // Knowledge areas: w knows the first 10 of 20 pairs, s all 20, in both seeds.
        let (labels, areas) = region_shares(&report, Scenario::Reward);
        assert_eq!(labels, ["w → s"]);
        let shares: Vec<f64> = areas.iter().map(|a| a[0].1.mean).collect();
        assert_eq!(shares, [0.5, 0.0, 0.5, 0.0]);
        assert!(!regions_svg(&report).contains("figure not drawn"));
        let svg = ds_vs_gap_svg(&report);
        assert!(
            svg.contains("none") && !svg.contains("figure not drawn"),
            "{svg}"
        );
        let svg = deception_vs_size_svg(&report);
        assert!(
            svg.contains("reward explicit α=0.5: DS_new − chance")
                && !svg.contains("figure not drawn"),
            "{svg}"
        );
        // Runs without compliance marks or conflicts: both figures say so, none panics.
        let empty = report_of(&[]);
        for svg in [
            dose_response_svg(&empty),
            collapse_svg(&empty),
            deception_vs_size_svg(&empty),
            regions_svg(&empty),
            ds_vs_gap_svg(&empty),
        ] {
            assert!(svg.contains("no data for this figure"), "{svg}");
        }
    }

    #[test]
    fn tick_labels_are_round_and_never_negative_zero() {
        assert_eq!(tick_label(&-0.0), "0");
        assert_eq!(tick_label(&-1e-9), "0");
        assert_eq!(tick_label(&0.30000000000000004), "0.3");
        assert_eq!(tick_label(&-0.05), "-0.05");
        assert_eq!(tick_label(&20.0), "20");
    }

    #[test]
    fn captions_wrap_at_word_boundaries() {
        let lines = wrap("aa bb cc dd", 5);
        assert_eq!(lines, ["aa bb", "cc dd"]);
        assert_eq!(wrap("", 5), Vec::<String>::new());
        // A word longer than the width stands alone rather than being cut.
        assert_eq!(wrap("a abcdefgh b", 4), ["a", "abcdefgh", "b"]);
    }
}
