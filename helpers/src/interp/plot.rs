//! Routing plots as PNG (shown inline with [`crate::plot::show_png`]).
//!
//! - [`usage_heatmap`]: MoE layers (rows) by experts (columns), each cell the expert's share of
//!   its layer's assignments divided by 1/E (1 = balanced; the colour scale tops out at the
//!   largest value, written in the title).
//! - [`transition_heatmap`]: a layer-to-layer transition matrix, each row normalised to sum 1.
//! - [`usage_over_training`]: one MoE layer's expert shares against tokens trained, from
//!   `expert_usage.jsonl`.
use super::UsageRow;
use crate::plot::{font, range};
use crate::WithCause;
use anyhow::{ensure, Result};
use plotters::prelude::*;
use std::path::Path;

/// White (0) to dark blue (1).
fn shade(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * v).round() as u8;
    RGBColor(lerp(255.0, 8.0), lerp(255.0, 48.0), lerp(255.0, 107.0))
}

/// Draws `values` (rows x columns) as coloured cells scaled to the largest value.
fn heatmap(values: &[Vec<f64>], row_labels: &[String], x_desc: &str, y_desc: &str, title: &str, path: &Path) -> Result<()> {
    ensure!(!values.is_empty() && !values[0].is_empty(), "nothing to plot for {}", path.display());
    font();
    let (rows, cols) = (values.len(), values[0].len());
    let max = values.iter().flatten().cloned().filter(|v| v.is_finite()).fold(0.0, f64::max).max(1e-12);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let (w, h) = ((220 + 18 * cols as u32).clamp(480, 1600), (140 + 26 * rows as u32).clamp(240, 1200));
        let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut c = ChartBuilder::on(&root)
            .caption(format!("{title} (darkest = {max:.3})"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5..cols as f64 - 0.5, -0.5..rows as f64 - 0.5)?; // cells centred on integers
        c.configure_mesh()
            .disable_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels(cols.min(17))
            .y_labels(rows.min(25))
            .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-6 { format!("{x:.0}") } else { String::new() })
            .y_label_formatter(&|y| if (y - y.round()).abs() < 1e-6 { row_labels.get(y.round() as usize).cloned().unwrap_or_default() } else { String::new() })
            .label_style(("sans-serif", 12))
            .draw()?;
        c.draw_series(values.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().map(move |(e, v)| {
                let v = if v.is_finite() { *v / max } else { 0.0 };
                Rectangle::new([(e as f64 - 0.5, r as f64 - 0.5), (e as f64 + 0.5, r as f64 + 0.5)], shade(v).filled())
            })
        }))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{e}")).with_cause(|| format!("cannot draw {}", path.display()))
}

/// Expert usage per MoE layer: `counts` (L_moe, E) as returned by `Routing::usage`.
pub fn usage_heatmap(counts: &[Vec<u64>], layers: &[i64], path: &Path, title: &str) -> Result<()> {
    let values: Vec<Vec<f64>> = counts
        .iter()
        .map(|c| {
            let total = c.iter().sum::<u64>().max(1) as f64;
            c.iter().map(|&x| x as f64 / total * c.len() as f64).collect()
        })
        .collect();
    let labels: Vec<String> = layers.iter().map(|l| format!("layer {l}")).collect();
    heatmap(&values, &labels, "expert", "", &format!("{title}: usage / balanced share"), path)
}

/// A transition matrix from `Routing::transitions`, rows normalised (row a: where tokens that used
/// expert a at the first layer go next).
pub fn transition_heatmap(m: &[Vec<u64>], path: &Path, title: &str) -> Result<()> {
    let values: Vec<Vec<f64>> = m
        .iter()
        .map(|r| {
            let total = r.iter().sum::<u64>().max(1) as f64;
            r.iter().map(|&x| x as f64 / total).collect()
        })
        .collect();
    let labels: Vec<String> = (0..m.len()).map(|e| e.to_string()).collect();
    heatmap(&values, &labels, "expert at the next layer", "expert", title, path)
}

/// Shares of each expert of MoE layer `layer_ix` against tokens trained.
pub fn usage_over_training(history: &[UsageRow], layer_ix: i64, path: &Path, title: &str) -> Result<()> {
    let pos = history.first().and_then(|r| r.layers.iter().position(|&l| l == layer_ix));
    let Some(pos) = pos else { anyhow::bail!("layer {layer_ix} is not a MoE layer of this usage history (or the history is empty)") };
    let n_experts = history[0].counts[pos].len();
    let lines: Vec<Vec<(f64, f64)>> = (0..n_experts)
        .map(|e| {
            history
                .iter()
                .map(|r| {
                    let c = &r.counts[pos];
                    (r.tokens as f64, c[e] / c.iter().sum::<f64>().max(1.0))
                })
                .collect()
        })
        .collect();
    font();
    let refs: Vec<&[(f64, f64)]> = lines.iter().map(|l| l.as_slice()).collect();
    let (x0, x1) = range(&refs, |p| p.0);
    let (_, y1) = range(&refs, |p| p.1);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (900, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut c = ChartBuilder::on(&root)
            .caption(format!("{title}: expert shares, layer {layer_ix} (balanced = {:.3})", 1.0 / n_experts as f64), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, 0.0..y1)?;
        c.configure_mesh()
            .x_desc("tokens trained")
            .y_desc("share of assignments")
            .x_label_formatter(&|v| format!("{v:.2e}"))
            .label_style(("sans-serif", 12))
            .draw()?;
        for (e, l) in lines.iter().enumerate() {
            c.draw_series(LineSeries::new(l.iter().cloned(), &Palette99::pick(e)))?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{e}")).with_cause(|| format!("cannot draw {}", path.display()))
}
