//! The no-conflict students' imitation DS against the capability gap, as SVG written directly,
//! and PNG rendering of every figure. The other figures are drawn with plotters
//! (`figures.rs`).

use std::fmt::Write as _;

use crate::report::Report;

const WIDTH: f64 = 900.0;
/// Ten distinguishable colours; series beyond ten are told apart by dash patterns too, so no
/// legend entry repeats a look.
const PALETTE: [&str; 10] = [
    "#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
    "#CCB974", "#64B5CD",
];
const DASHES: [&str; 3] = ["", "6 3", "2 2"];

/// Colour and dash pattern of series `i`.
fn style(i: usize) -> (&'static str, &'static str) {
    (
        PALETTE[i % PALETTE.len()],
        DASHES[(i / PALETTE.len()) % DASHES.len()],
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn header(height: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"16\">{}</text>\n",
        WIDTH / 2.0,
        escape(title)
    )
}

/// No-conflict students: DS (filled) and its chance baseline (hollow) against strong − weak
/// ceiling accuracy. This DS measures how much the student copies its teacher's mistakes.
pub fn ds_vs_gap_svg(report: &Report) -> String {
    let (left, right, top, bottom) = (70.0, 260.0, 50.0, 420.0);
    let height = bottom + 60.0;
    let mut svg = header(
        height,
        "No-conflict students: imitation of weak errors (DS, chance hollow) vs capability gap",
    );
    let rows: Vec<&crate::report::Comparison> = report
        .comparisons
        .iter()
        .filter(|c| c.baseline_run_id.is_none())
        .collect();
    let series: Vec<String> = {
        let mut v: Vec<String> = rows
            .iter()
            .map(|c| format!("{} [{}]", c.scenario, c.variant))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let gaps: Vec<f64> = rows.iter().map(|c| c.capability_gap).collect();
    let (mut lo, mut hi) = gaps
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &g| {
            (a.min(g), b.max(g))
        });
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (-0.1, 0.1);
    }
    if hi - lo < 1e-9 {
        lo -= 0.05;
        hi += 0.05;
    }
    let pad = (hi - lo) * 0.1;
    let (lo, hi) = (lo - pad, hi + pad);
    let plot_w = WIDTH - left - right;
    let x = |g: f64| left + (g - lo) / (hi - lo) * plot_w;
    let y = |v: f64| bottom - v.clamp(0.0, 1.0) * (bottom - top);
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"black\"/><line x1=\"{left}\" x2=\"{}\" y1=\"{bottom}\" y2=\"{bottom}\" stroke=\"black\"/>",
        left + plot_w
    );
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{tick}</text>",
            left - 6.0,
            y(tick) + 4.0
        );
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#eee\"/>",
            left + plot_w,
            y(tick)
        );
    }
    for i in 0..=4 {
        let g = lo + (hi - lo) * i as f64 / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{g:.3}</text>",
            x(g),
            bottom + 16.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">capability gap: strong ceiling − weak ceiling accuracy</text>",
        left + plot_w / 2.0,
        bottom + 36.0
    );
    let _ = writeln!(
        svg,
        "<text x=\"18\" y=\"{}\" transform=\"rotate(-90 18 {})\" text-anchor=\"middle\">DS (share of mistakes in S_k that lie in W_uk)</text>",
        (top + bottom) / 2.0,
        (top + bottom) / 2.0
    );
    for (i, c) in rows.iter().enumerate() {
        let key = format!("{} [{}]", c.scenario, c.variant);
        let (color, _) = style(series.iter().position(|s| *s == key).unwrap_or(0));
        let cx = x(c.capability_gap) + (i as f64 % 5.0 - 2.0) * 3.0;
        if let Some(chance) = c.ds_chance {
            let _ = writeln!(
                svg,
                "<circle cx=\"{cx:.1}\" cy=\"{:.1}\" r=\"5\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
                y(chance)
            );
        }
        if let Some(ds) = c.ds {
            if let Some((l, h)) = c.ds_ci95 {
                let _ = writeln!(
                    svg,
                    "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{color}\"/>",
                    y(l),
                    y(h)
                );
            }
            let _ = writeln!(
                svg,
                "<circle cx=\"{cx:.1}\" cy=\"{:.1}\" r=\"5\" fill=\"{color}\"/>",
                y(ds)
            );
        }
    }
    let lx = left + plot_w + 16.0;
    let _ = writeln!(
        svg,
        "<text x=\"{lx}\" y=\"{}\">filled: DS (95% CI), hollow: chance</text>",
        top
    );
    for (i, label) in series.iter().enumerate() {
        let (color, _) = style(i);
        let ly = top + 20.0 + i as f64 * 16.0;
        let _ = writeln!(
            svg,
            "<circle cx=\"{}\" cy=\"{}\" r=\"5\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\" font-size=\"10\">{}</text>",
            lx + 5.0,
            ly - 4.0,
            lx + 14.0,
            ly,
            escape(label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Renders an SVG to PNG at 1:1 scale. Text uses the system fonts (sans-serif); on a machine
/// without any font the PNG has the shapes but no text, which the returned flag reports.
pub fn svg_to_png(svg: &str) -> Result<(Vec<u8>, bool), String> {
    use resvg::{tiny_skia, usvg};
    let mut options = usvg::Options::default();
    let db = options.fontdb_mut();
    db.load_system_fonts();
    // fontdb maps `sans-serif` to Arial; point it at a sans face this machine has.
    let families: Vec<String> = db
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .collect();
    let sans = families
        .iter()
        .find(|f| f.contains("Sans") && !f.contains("Mono"))
        .or_else(|| families.first())
        .cloned();
    if let Some(sans) = &sans {
        db.set_sans_serif_family(sans.clone());
    }
    let has_fonts = sans.is_some();
    let tree = usvg::Tree::from_str(svg, &options).map_err(|e| e.to_string())?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).ok_or("empty image")?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    let png = pixmap.encode_png().map_err(|e| e.to_string())?;
    Ok((png, has_fonts))
}
