//! Routing plots as PNG (shown inline with [`crate::plot::show_pngs`]).
//!
//! - [`usage_heatmap`]: MoE layers (rows) by experts (columns), each cell the expert's share of its
//!   layer's assignments divided by the balanced share 1/E, on a log2 colour scale: white is
//!   balanced, red over-used, blue under-used (saturating at 4x and 1/4).
//! - [`transition_heatmap`]: a layer-to-layer transition matrix, each row normalised to sum 1
//!   (P(expert at the next layer | expert at this one)), on a fixed 0..1 scale; grey rows had no
//!   tokens.
//! - [`tree_usage`]: usage down a tree of experts, a row per depth, each expert under its parent.
//! - [`usage_over_training`]: every MoE layer's expert shares against tokens trained (one panel per
//!   layer, the balanced share dashed), from `expert_usage.jsonl`.
//!
//! Every heatmap has a colour bar, and writes each cell's value in it when the cells are large
//! enough to read.
use super::UsageRow;
use crate::plot::{colour, font, Area, DrawResult, Line, Panel, Reference, XAxis};
use crate::WithCause;
use anyhow::{ensure, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// How a heatmap turns a value into a colour, and how its colour bar is labelled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scale {
    /// A ratio to the balanced share, on a log2 axis: blue (1/4 and below), white (1), red (4 and above).
    Balance,
    /// A fraction: white (0) to dark blue (1).
    Fraction,
}

const NO_DATA: RGBColor = RGBColor(215, 215, 215);

impl Scale {
    /// The value's position on the colour bar: log2 of the ratio clamped to -2..2, or the fraction.
    fn position(self, v: f64) -> f64 {
        match self {
            Scale::Balance => v.max(1e-9).log2().clamp(-2.0, 2.0),
            Scale::Fraction => v.clamp(0.0, 1.0),
        }
    }
    fn bar(self) -> (f64, f64) {
        match self {
            Scale::Balance => (-2.0, 2.0),
            Scale::Fraction => (0.0, 1.0),
        }
    }
    /// The colour of a value (light grey for NaN: no data).
    pub fn colour(self, v: f64) -> RGBColor {
        if !v.is_finite() {
            return NO_DATA;
        }
        let lerp = |to: (f64, f64, f64), t: f64| {
            let f = |a: f64| (255.0 + (a - 255.0) * t).round() as u8;
            RGBColor(f(to.0), f(to.1), f(to.2))
        };
        match self {
            Scale::Balance => {
                let t = self.position(v) / 2.0;
                if t < 0.0 { lerp((33.0, 102.0, 172.0), -t) } else { lerp((178.0, 24.0, 43.0), t) }
            }
            Scale::Fraction => lerp((8.0, 48.0, 107.0), self.position(v)),
        }
    }
    fn label(self, pos: f64) -> String {
        if self == Scale::Fraction {
            return crate::plot::sci(pos);
        }
        if (pos - pos.round()).abs() > 1e-6 {
            return String::new();
        }
        match self {
            Scale::Balance => match pos.round() as i64 {
                -2 => "<= 1/4".into(),
                -1 => "1/2".into(),
                0 => "1 (balanced)".into(),
                1 => "2".into(),
                _ => ">= 4".into(),
            },
            Scale::Fraction => unreachable!(),
        }
    }
    fn cell_text(self, v: f64) -> Option<String> {
        match self {
            _ if !v.is_finite() => None,
            Scale::Balance => Some(format!("{v:.2}")),
            Scale::Fraction if v < 0.005 => None,
            Scale::Fraction => Some(format!("{v:.2}")),
        }
    }
}

/// Draws `values` (rows x columns; NaN = no data) as coloured cells, with a colour bar.
fn heatmap(values: &[Vec<f64>], row_labels: &[String], x_desc: &str, y_desc: &str, title: &str, subtitle: &str, scale: Scale, path: &Path) -> Result<()> {
    ensure!(!values.is_empty() && !values[0].is_empty(), "nothing to plot for {}", path.display());
    font();
    let (rows, cols) = (values.len(), values[0].len());
    let (cw, ch) = ((640 / cols as u32).clamp(10, 56), (360 / rows as u32).clamp(12, 44));
    let annotate = cw >= 34 && ch >= 18;
    let (w, h) = ((110 + cw * cols as u32 + 150).max(620), 110 + ch * rows as u32 + 60);
    let draw = || -> DrawResult {
        let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 18))?;
        let (top, rest) = root.split_vertically(26);
        top.draw(&Text::new(subtitle.to_string(), (w as i32 / 2, 4), ("sans-serif", 13).into_font().color(&RGBColor(80, 80, 80)).pos(Pos::new(HPos::Center, VPos::Top))))?;
        let (left, right) = rest.split_horizontally(w - 150);
        let mut c = ChartBuilder::on(&left)
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..cols as f64 - 0.5, -0.5..rows as f64 - 0.5)?; // cells centred on integers
        c.configure_mesh()
            .disable_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels(cols.min(17))
            .y_labels(rows.min(25))
            .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-6 { format!("{x:.0}") } else { String::new() })
            .y_label_formatter(&|y| if (y - y.round()).abs() < 1e-6 { row_labels.get(y.round() as usize).cloned().unwrap_or_default() } else { String::new() })
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 14))
            .draw()?;
        c.draw_series(values.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().map(move |(e, v)| Rectangle::new([(e as f64 - 0.5, r as f64 - 0.5), (e as f64 + 0.5, r as f64 + 0.5)], scale.colour(*v).filled()))
        }))?;
        if annotate {
            for (r, row) in values.iter().enumerate() {
                for (e, v) in row.iter().enumerate() {
                    let Some(text) = scale.cell_text(*v) else { continue };
                    let dark = { let RGBColor(r, g, b) = scale.colour(*v); (r as u32 + g as u32 + b as u32) < 380 };
                    let style = ("sans-serif", 12).into_font().color(if dark { &WHITE } else { &BLACK }).pos(Pos::new(HPos::Center, VPos::Center));
                    c.draw_series(std::iter::once(Text::new(text, (e as f64, r as f64), style)))?;
                }
            }
        }
        colour_bar(&right, scale, h)?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{e}")).with_cause(|| format!("cannot draw {}", path.display()))
}

/// A vertical colour bar for `scale`, labelled on its right.
fn colour_bar(area: &Area, scale: Scale, h: u32) -> DrawResult {
    let (b0, b1) = scale.bar();
    let mut c = ChartBuilder::on(area)
        .margin_top(10)
        .margin_bottom(50.min(h / 4))
        .margin_left(8)
        .set_label_area_size(LabelAreaPosition::Right, 100)
        .build_cartesian_2d(0.0..1.0, b0..b1)?;
    c.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(9)
        .y_label_formatter(&|v| scale.label(*v))
        .label_style(("sans-serif", 12))
        .draw()?;
    let n = 120;
    let step = (b1 - b0) / n as f64;
    c.draw_series((0..n).map(|i| {
        let y = b0 + i as f64 * step;
        let v = match scale {
            Scale::Balance => 2f64.powf(y + step / 2.0),
            Scale::Fraction => y + step / 2.0,
        };
        Rectangle::new([(0.0, y), (1.0, y + step)], scale.colour(v).filled())
    }))?;
    Ok(())
}

/// Expert usage per MoE layer: `counts` (L_moe, E) as returned by `Routing::usage`.
pub fn usage_heatmap(counts: &[Vec<u64>], layers: &[i64], path: &Path, title: &str) -> Result<()> {
    let shares: Vec<Vec<f64>> = counts
        .iter()
        .map(|c| {
            let total = c.iter().sum::<u64>();
            c.iter().map(|&x| if total == 0 { f64::NAN } else { x as f64 / total as f64 }).collect()
        })
        .collect();
    share_heatmap(&shares, layers, path, title)
}

/// [`usage_heatmap`] from each layer's expert shares (rows summing to 1; NaN: no assignments).
pub fn share_heatmap(shares: &[Vec<f64>], layers: &[i64], path: &Path, title: &str) -> Result<()> {
    let values: Vec<Vec<f64>> = shares.iter().map(|s| s.iter().map(|x| x * s.len() as f64).collect()).collect();
    let labels: Vec<String> = layers.iter().map(|l| format!("layer {l}")).collect();
    let e = shares.first().map_or(0, |c| c.len());
    let subtitle = format!("each cell: the expert's share of its layer's assignments / the balanced share 1/{e}");
    heatmap(&values, &labels, "expert", "", &format!("{title}: expert usage"), &subtitle, Scale::Balance, path)
}

/// A transition matrix from `Routing::transitions`, rows normalised (row a: where tokens that used
/// expert a at the first layer go next; a row with no tokens is grey).
pub fn transition_heatmap(m: &[Vec<u64>], path: &Path, title: &str) -> Result<()> {
    let values: Vec<Vec<f64>> = m
        .iter()
        .map(|r| {
            let total = r.iter().sum::<u64>();
            r.iter().map(|&x| if total == 0 { f64::NAN } else { x as f64 / total as f64 }).collect()
        })
        .collect();
    let labels: Vec<String> = (0..m.len()).map(|e| e.to_string()).collect();
    let subtitle = "each row sums to 1: P(expert at the next layer | expert at this layer); grey: no such token routed there";
    heatmap(&values, &labels, "expert at the next layer", "expert at this layer", title, subtitle, Scale::Fraction, path)
}

/// Usage down a tree of experts (`interp::tree`): one panel per MoE layer, a row per depth (the
/// root's children on top), each expert a cell under its parent, coloured by its share of its
/// depth's (token, path) slots over the balanced share 1/b^d (the usage heatmap's scale).
/// `counts` (L_moe, E) as `Routing::usage` returns them.
pub fn tree_usage(counts: &[Vec<u64>], layers: &[i64], tree: super::tree::Tree, path: &Path, title: &str) -> Result<()> {
    ensure!(!counts.is_empty() && counts.iter().all(|c| c.len() == tree.experts()), "usage must be (MoE layers, {}) for this tree", tree.experts());
    font();
    let (cols, rows) = grid(counts.len());
    let (pw, ph) = (460u32, 60 + 40 * tree.n as u32);
    let (w, h) = (cols as u32 * pw + 150, 76 + rows as u32 * ph);
    let draw = || -> DrawResult {
        let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(&format!("{title}: expert usage down the tree"), ("sans-serif", 18))?;
        let (top, rest) = root.split_vertically(26);
        let subtitle = "each expert under its parent; colour: its share of its depth's slots / the balanced share 1/b^d";
        top.draw(&Text::new(subtitle, (w as i32 / 2, 4), ("sans-serif", 13).into_font().color(&RGBColor(80, 80, 80)).pos(Pos::new(HPos::Center, VPos::Top))))?;
        let (left, right) = rest.split_horizontally(w - 150);
        for ((c, &layer), area) in counts.iter().zip(layers).zip(left.split_evenly((rows, cols)).iter()) {
            let n = tree.n as f64;
            let mut chart = ChartBuilder::on(area)
                .caption(format!("layer {layer}"), ("sans-serif", 15))
                .margin(8)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..1.0, 0.0..n)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .disable_x_axis()
                .y_labels(tree.n * 2 + 1)
                .y_label_formatter(&|y| {
                    let d = n - y + 0.5; // row centres are depths
                    if (d - d.round()).abs() < 1e-6 && d >= 1.0 { format!("depth {}", d.round()) } else { String::new() }
                })
                .label_style(("sans-serif", 12))
                .draw()?;
            for d in 1..=tree.n {
                let width = tree.b.pow(d as u32);
                let block = &c[tree.offset(d)..tree.offset(d) + width];
                let total = block.iter().sum::<u64>();
                let y = n - d as f64;
                let cell_px = (pw as f64 - 80.0) / width as f64;
                for (j, &x) in block.iter().enumerate() {
                    let v = if total == 0 { f64::NAN } else { x as f64 / total as f64 * width as f64 };
                    let (x0, x1) = (j as f64 / width as f64, (j + 1) as f64 / width as f64);
                    chart.draw_series(std::iter::once(Rectangle::new([(x0, y), (x1, y + 1.0)], Scale::Balance.colour(v).filled())))?;
                    chart.draw_series(std::iter::once(Rectangle::new([(x0, y), (x1, y + 1.0)], ShapeStyle::from(&WHITE).stroke_width(1))))?;
                    if cell_px >= 34.0 {
                        if let Some(text) = Scale::Balance.cell_text(v) {
                            let style = ("sans-serif", 11).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center));
                            chart.draw_series(std::iter::once(Text::new(text, ((x0 + x1) / 2.0, y + 0.5), style)))?;
                        }
                    }
                }
            }
        }
        colour_bar(&right, Scale::Balance, h)?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{e}")).with_cause(|| format!("cannot draw {}", path.display()))
}

/// Above this many experts a panel shows the most used, median and least used share instead of a
/// line per expert.
const MAX_LINES: usize = 12;

/// The lines of one layer's panel: each expert's share (or the most used / median / least used
/// share) against tokens trained.
fn usage_lines(history: &[UsageRow], pos: usize) -> Vec<Line> {
    let shares: Vec<(f64, Vec<f64>)> = history
        .iter()
        .map(|r| {
            let c = &r.counts[pos];
            let total = c.iter().sum::<f64>().max(1.0);
            (r.tokens as f64, c.iter().map(|x| x / total).collect())
        })
        .collect();
    let n_experts = shares.first().map_or(0, |s| s.1.len());
    if n_experts <= MAX_LINES {
        return (0..n_experts).map(|e| Line::new(format!("expert {e}"), shares.iter().map(|(t, s)| (*t, s[e])).collect(), colour(e))).collect();
    }
    let pick = |f: &dyn Fn(&[f64]) -> f64| -> Vec<(f64, f64)> {
        shares.iter().map(|(t, s)| { let mut v = s.clone(); v.sort_by(f64::total_cmp); (*t, f(&v)) }).collect()
    };
    vec![
        Line::new("most used expert", pick(&|v| v[v.len() - 1]), colour(1)),
        Line::new("median expert", pick(&|v| v[v.len() / 2]), colour(0)),
        Line::new("least used expert", pick(&|v| v[0]), colour(2)),
    ]
}

/// The grid of small multiples for `n` panels: (columns, rows).
pub fn grid(n: usize) -> (usize, usize) {
    let cols = (n as f64).sqrt().ceil().clamp(1.0, 4.0) as usize;
    (cols, n.div_ceil(cols).max(1))
}

/// Every MoE layer's expert shares against tokens trained, one panel per layer.
pub fn usage_over_training(history: &[UsageRow], path: &Path, title: &str) -> Result<()> {
    ensure!(!history.is_empty(), "no expert usage history to plot for {}", path.display());
    let layers = history[0].layers.clone();
    ensure!(!layers.is_empty(), "the usage history has no MoE layers");
    let n_experts = history[0].counts[0].len();
    let balanced = 1.0 / n_experts as f64;
    let x_range = {
        let hi = history.iter().map(|r| r.tokens as f64).fold(0.0, f64::max);
        (0.0, hi.max(1.0))
    };
    let panels: Vec<Panel> = layers
        .iter()
        .enumerate()
        .map(|(pos, l)| {
            let mut p = Panel::new(format!("layer {l}"), "share of assignments", XAxis::Count, x_range);
            p.lines = usage_lines(history, pos);
            let hi = p.lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).fold(balanced * 2.0, f64::max);
            p.y_range = Some((0.0, hi * 1.08));
            p.references.push(Reference { name: format!("balanced 1/{n_experts}"), y: balanced });
            p.legend = pos == 0;
            p
        })
        .collect();
    font();
    let (cols, rows) = grid(panels.len());
    let (w, h) = (cols as u32 * 520, 50 + rows as u32 * 340);
    let draw = || -> DrawResult {
        let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(&format!("{title}: expert shares of each MoE layer against tokens trained"), ("sans-serif", 18))?;
        for (p, area) in panels.iter().zip(root.split_evenly((rows, cols)).iter()) {
            p.draw(area)?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{e}")).with_cause(|| format!("cannot draw {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_colours_are_white_when_balanced_red_over_blue_under() {
        assert_eq!(Scale::Balance.colour(1.0), RGBColor(255, 255, 255));
        assert_eq!(Scale::Balance.colour(4.0), RGBColor(178, 24, 43));
        assert_eq!(Scale::Balance.colour(100.0), Scale::Balance.colour(4.0), "saturates at 4x");
        assert_eq!(Scale::Balance.colour(0.25), RGBColor(33, 102, 172));
        assert_eq!(Scale::Balance.colour(0.0), Scale::Balance.colour(0.25), "an unused expert is the darkest blue");
        let RGBColor(r, _, b) = Scale::Balance.colour(2.0);
        assert!(r > b, "2x is reddish");
        assert_eq!(Scale::Balance.colour(f64::NAN), NO_DATA);
        assert_eq!(Scale::Fraction.colour(0.0), RGBColor(255, 255, 255));
        assert_eq!(Scale::Fraction.colour(1.0), RGBColor(8, 48, 107));
    }

    #[test]
    fn colour_bar_labels() {
        assert_eq!(Scale::Balance.label(0.0), "1 (balanced)");
        assert_eq!(Scale::Balance.label(-1.0), "1/2");
        assert_eq!(Scale::Balance.label(0.5), "");
        assert_eq!(Scale::Fraction.label(0.25), "0.25");
    }

    #[test]
    fn small_multiples_grid() {
        assert_eq!(grid(1), (1, 1));
        assert_eq!(grid(4), (2, 2));
        assert_eq!(grid(5), (3, 2));
        assert_eq!(grid(16), (4, 4));
        assert_eq!(grid(24), (4, 6));
    }

    #[test]
    fn many_experts_are_summarised_few_are_drawn_one_by_one() {
        let row = |e: usize| UsageRow { step: 1, tokens: 10, layers: vec![0], counts: vec![(0..e).map(|i| i as f64).collect()] };
        let few = usage_lines(&[row(8)], 0);
        assert_eq!(few.len(), 8);
        assert_eq!(few[7].points, vec![(10.0, 7.0 / 28.0)]);
        let many = usage_lines(&[row(64)], 0);
        let names: Vec<&str> = many.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["most used expert", "median expert", "least used expert"]);
        assert_eq!(many[0].points[0].1, 63.0 / 2016.0);
        assert_eq!(many[2].points[0].1, 0.0);
    }
}

#[cfg(test)]
mod tree_tests {
    use super::*;

    #[test]
    fn tree_usage_draws_one_panel_per_layer_and_checks_the_shape() {
        let tree = crate::interp::tree::Tree { b: 2, n: 3 };
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tree.png");
        tree_usage(&[vec![1; 14], vec![2; 14], vec![0; 14]], &[0, 1, 2], tree, &p, "t").unwrap();
        let img = image::open(&p).unwrap().to_rgba8();
        assert_eq!(img.dimensions(), (2 * 460 + 150, 76 + 2 * (60 + 40 * 3)), "a 2 x 2 grid for 3 layers");
        assert!(tree_usage(&[vec![1; 6]], &[0], tree, &p, "t").is_err(), "6 experts are not this tree's 14");
    }
}
