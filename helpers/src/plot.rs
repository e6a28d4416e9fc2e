//! Plots of a run, as PNG files the notebook shows inline.
//!
//! [`training_curves`] draws the training and validation loss against optimizer steps, and the
//! learning rate, from the rows of `metrics.jsonl`. [`show_png`] displays a PNG in the notebook
//! (evcxr's rich-output protocol; outside a notebook it prints only the file's path). Text is
//! rendered with the DejaVu Sans font compiled into the crate, so no system fonts are needed.
use crate::WithCause;
use anyhow::Result;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

pub(crate) fn font() {
    // Registering twice is harmless; plotters keeps the last one.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
}

/// (x, y) points of `key` against `step` in `rows`, skipping rows without a finite value.
pub fn series(rows: &[serde_json::Value], key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect()
}

pub(crate) fn range(points: &[&[(f64, f64)]], pick: impl Fn(&(f64, f64)) -> f64) -> (f64, f64) {
    let vals: Vec<f64> = points.iter().flat_map(|p| p.iter().map(&pick)).collect();
    let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

/// Writes `training_curves.png`-style plots: cross-entropy (train `train.base_loss`, validation
/// `val.loss`, so both curves measure the same thing) and learning rate against step. `title` goes on top (e.g. the preset and run name).
pub fn training_curves(rows: &[serde_json::Value], path: &Path, title: &str) -> Result<()> {
    font();
    let train = series(rows, "train.base_loss");
    let val = series(rows, "val.loss");
    let lr = series(rows, "lr");
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 22))?;
        let (left, right) = root.split_horizontally(720);
        let (x0, x1) = range(&[&train, &val, &lr], |p| p.0);
        let (y0, y1) = range(&[&train, &val], |p| p.1);
        let mut c = ChartBuilder::on(&left).caption("loss", ("sans-serif", 18)).margin(12).x_label_area_size(36).y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        c.configure_mesh().x_desc("optimizer step").y_desc("cross-entropy (nats)").x_label_formatter(&|v| format!("{v:.0}")).label_style(("sans-serif", 13)).draw()?;
        c.draw_series(LineSeries::new(train.iter().cloned(), &BLUE))?.label("train").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        c.draw_series(LineSeries::new(val.iter().cloned(), &RED))?.label("validation").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        c.draw_series(val.iter().map(|p| Circle::new(*p, 3, RED.filled())))?;
        c.configure_series_labels().background_style(WHITE).border_style(BLACK).label_font(("sans-serif", 14)).draw()?;
        let (l0, l1) = range(&[&lr], |p| p.1);
        let mut c = ChartBuilder::on(&right).caption("learning rate", ("sans-serif", 18)).margin(12).x_label_area_size(36).y_label_area_size(70)
            .build_cartesian_2d(x0..x1, l0.max(0.0)..l1)?;
        c.configure_mesh().x_desc("optimizer step").x_label_formatter(&|v| format!("{v:.0}")).y_label_formatter(&|v| format!("{v:.1e}")).label_style(("sans-serif", 13)).draw()?;
        c.draw_series(LineSeries::new(lr.iter().cloned(), &GREEN))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{e}")).with_cause(|| format!("cannot draw {}", path.display()))
}

/// Shows several PNGs inline as one image, one above the other (left-aligned, 12 white pixels
/// between them). evcxr keeps one image per cell (a cell's outputs are keyed by MIME type), so
/// separate [`show_png`] calls in one cell would show only the last figure.
pub fn show_pngs(paths: &[PathBuf]) -> Result<()> {
    match paths {
        [] => Ok(()),
        [one] => show_png(one),
        _ if std::env::var_os("EVCXR_IS_RUNTIME").is_none() => {
            paths.iter().for_each(|p| println!("plot: {}", p.display()));
            Ok(())
        }
        _ => {
            use base64::Engine;
            let png = stack_pngs(paths)?;
            println!("EVCXR_BEGIN_CONTENT image/png\n{}\nEVCXR_END_CONTENT", base64::engine::general_purpose::STANDARD.encode(png));
            Ok(())
        }
    }
}

/// The PNGs at `paths` stacked vertically into one PNG (see [`show_pngs`]).
pub fn stack_pngs(paths: &[PathBuf]) -> Result<Vec<u8>> {
    const GAP: u32 = 12;
    let images: Vec<image::RgbaImage> = paths
        .iter()
        .map(|p| image::open(p).map(|i| i.to_rgba8()).map_err(anyhow::Error::from).with_cause(|| format!("cannot read {}", p.display())))
        .collect::<Result<_>>()?;
    let width = images.iter().map(|i| i.width()).max().unwrap_or(1);
    let height = images.iter().map(|i| i.height()).sum::<u32>() + GAP * images.len().saturating_sub(1) as u32;
    let mut out = image::RgbaImage::from_pixel(width, height.max(1), image::Rgba([255, 255, 255, 255]));
    let mut y = 0i64;
    for i in &images {
        image::imageops::overlay(&mut out, i, 0, y);
        y += (i.height() + GAP) as i64;
    }
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgba8(out).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    Ok(bytes)
}

/// Shows a PNG inline in a Jupyter notebook run by evcxr (its `EVCXR_BEGIN_CONTENT` protocol).
pub fn show_png(path: &Path) -> Result<()> {
    use base64::Engine;
    let bytes = std::fs::read(path).with_cause(|| format!("cannot read {}", path.display()))?;
    if std::env::var_os("EVCXR_IS_RUNTIME").is_some() {
        println!("EVCXR_BEGIN_CONTENT image/png\n{}\nEVCXR_END_CONTENT", base64::engine::general_purpose::STANDARD.encode(bytes));
    } else {
        println!("plot: {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_stack_into_one_image_with_gaps() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.png"), d.path().join("b.png"));
        image::RgbaImage::from_pixel(30, 20, image::Rgba([255, 0, 0, 255])).save(&a).unwrap();
        image::RgbaImage::from_pixel(50, 10, image::Rgba([0, 0, 255, 255])).save(&b).unwrap();
        let stacked = image::load_from_memory(&stack_pngs(&[a, b]).unwrap()).unwrap().to_rgba8();
        assert_eq!(stacked.dimensions(), (50, 20 + 12 + 10));
        assert_eq!(stacked.get_pixel(0, 0).0, [255, 0, 0, 255]);
        assert_eq!(stacked.get_pixel(40, 5).0, [255, 255, 255, 255], "white beside the narrower figure");
        assert_eq!(stacked.get_pixel(0, 25).0, [255, 255, 255, 255], "the gap");
        assert_eq!(stacked.get_pixel(49, 41).0, [0, 0, 255, 255]);
    }
}
