//! PNG rendering of the report's SVG figures (`figures.rs` draws them).

/// Why a figure's SVG could not become a PNG.
#[derive(Debug, thiserror::Error)]
pub enum PngError {
    #[error("parsing the SVG: {0}")]
    Svg(#[from] resvg::usvg::Error),
    #[error("the figure has no area to draw")]
    Empty,
    #[error("encoding the PNG: {0}")]
    Encode(String),
}

/// Renders an SVG to PNG at 1:1 scale. Text uses the system fonts (sans-serif); on a machine
/// without any font the PNG has the shapes but no text, which the returned flag reports.
pub fn svg_to_png(svg: &str) -> Result<(Vec<u8>, bool), PngError> {
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
    let tree = usvg::Tree::from_str(svg, &options)?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).ok_or(PngError::Empty)?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    let png = pixmap
        .encode_png()
        .map_err(|e| PngError::Encode(e.to_string()))?;
    Ok((png, has_fonts))
}
