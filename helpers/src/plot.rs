//! Plots of a run, as PNG files the notebook shows inline.
//!
//! [`training_curves`] draws six panels from the rows of `metrics.jsonl`: the cross-entropy (train
//! and validation), every auxiliary loss the run logs (`train.*` beside the cross-entropy and the
//! total, so a loss an experiment adds shows without editing this file), the learning rate, the
//! gradient norm, the validation accuracy and the throughput. [`show_png`] and [`show_pngs`]
//! display PNGs in the notebook (evcxr's rich-output protocol; outside a notebook they print only
//! the paths). Text is rendered with the DejaVu Sans font compiled into the crate, so no system
//! fonts are needed.
//!
//! The building block is [`Panel`]: a titled chart of named lines with a legend, reference lines,
//! readable tick labels ([`si`], [`sci`]), a log axis when the values span decades, and integer
//! steps on short runs. The routing plots ([`crate::interp::plot`]) use it too.
use crate::WithCause;
use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

pub(crate) type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
pub(crate) type DrawResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

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

/// A tick label for a count: `950`, `50k`, `1.5M`, `2G` (at most three significant digits).
pub fn si(v: f64) -> String {
    let a = v.abs();
    let (scaled, unit) = match a {
        _ if a >= 1e9 => (v / 1e9, "G"),
        _ if a >= 1e6 => (v / 1e6, "M"),
        _ if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    format!("{}{unit}", trim(&format!("{scaled:.2}")))
}

/// A tick label for a quantity of any size: `0.5`, `12`, `3e-3`, `2.5e-4` (no `3.00e-3` noise).
pub fn sci(v: f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        "0".into() // and the 5.55e-17 that tick arithmetic leaves for zero
    } else if (1e-2..1e4).contains(&a) {
        trim(&format!("{v:.3}"))
    } else {
        let s = format!("{v:.2e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        format!("{}e{e}", trim(m))
    }
}

/// "2.50" -> "2.5", "3.00" -> "3", "-0.00" -> "0".
fn trim(s: &str) -> String {
    let t = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.') } else { s };
    if t == "-0" { "0".into() } else { t.into() }
}

/// The smallest and largest value `pick` takes over `points` (None when there are none).
pub(crate) fn extent(points: &[&[(f64, f64)]], pick: impl Fn(&(f64, f64)) -> f64) -> Option<(f64, f64)> {
    let vals: Vec<f64> = points.iter().flat_map(|p| p.iter().map(&pick)).filter(|v| v.is_finite()).collect();
    let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    lo.is_finite().then_some((lo, hi))
}

/// `extent` with 5% room either side (0..1 without points), as the sweep plots use it.
pub(crate) fn range(points: &[&[(f64, f64)]], pick: impl Fn(&(f64, f64)) -> f64) -> (f64, f64) {
    match extent(points, pick) {
        None => (0.0, 1.0),
        Some((lo, hi)) => {
            let pad = ((hi - lo) * 0.05).max(1e-9);
            (lo - pad, hi + pad)
        }
    }
}

/// A value axis around `lo..hi` with 5% room; a constant series gets +-10% of its value (so its
/// ticks differ and its line is visible), zero gets 0..1.
pub(crate) fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let span = hi - lo;
    if span <= 1e-9 * hi.abs().max(lo.abs()) || span == 0.0 {
        let half = if hi.abs() > 0.0 { 0.1 * hi.abs() } else { 0.5 };
        return (lo - half, hi + half);
    }
    (lo - 0.05 * span, hi + 0.05 * span)
}

/// Whether values in `lo..=hi` span enough decades for a log axis (all positive, hi/lo > 30).
pub(crate) fn wants_log(lo: f64, hi: f64) -> bool {
    lo > 0.0 && hi / lo > 30.0
}

/// A named line of a [`Panel`].
pub(crate) struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    /// Dots at the points (drawn anyway when there are few points, so one point still shows).
    pub markers: bool,
}

impl Line {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>, color: RGBColor) -> Self {
        Self { name: name.into(), points, color, markers: false }
    }
}

/// A horizontal reference line (a balanced share, a chance level), dashed, with its label in the legend.
pub(crate) struct Reference {
    pub name: String,
    pub y: f64,
}

/// How the x axis counts.
#[derive(Clone, Copy)]
pub(crate) enum XAxis {
    /// Optimizer steps: integer ticks only (a 5-step run reads 0 1 2 3 4 5).
    Steps,
    /// Tokens, counts: `50k`, `1.5M`.
    Count,
}

/// One chart: title, axis names, lines with a legend, reference lines, and an x range shared with
/// the other panels of its figure.
pub(crate) struct Panel {
    pub title: String,
    pub y_desc: String,
    pub x_desc: String,
    pub x_axis: XAxis,
    pub x_range: (f64, f64),
    pub lines: Vec<Line>,
    pub references: Vec<Reference>,
    /// None: a log axis when the values span decades ([`wants_log`]).
    pub log_y: Option<bool>,
    /// Fixed y range (e.g. 0..max for shares); None: from the data.
    pub y_range: Option<(f64, f64)>,
    /// Draw the legend (small multiples show it once).
    pub legend: bool,
}

/// Palette: colour-blind-friendly (Okabe-Ito, black swapped for purple), then plotters' 99 for longer lists.
pub(crate) fn colour(i: usize) -> RGBColor {
    const OKABE_ITO: [RGBColor; 8] = [
        RGBColor(0, 114, 178),
        RGBColor(213, 94, 0),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
        RGBColor(230, 159, 0),
        RGBColor(86, 180, 233),
        RGBColor(117, 112, 179), // purple in place of Okabe-Ito's black: reference lines are black
        RGBColor(240, 228, 66),
    ];
    match OKABE_ITO.get(i) {
        Some(c) => *c,
        None => {
            let c = Palette99::pick(i).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

impl Panel {
    pub fn new(title: impl Into<String>, y_desc: impl Into<String>, x_axis: XAxis, x_range: (f64, f64)) -> Self {
        let x_desc = match x_axis {
            XAxis::Steps => "optimizer step",
            XAxis::Count => "tokens trained",
        };
        Self { title: title.into(), y_desc: y_desc.into(), x_desc: x_desc.into(), x_axis, x_range, lines: vec![], references: vec![], log_y: None, y_range: None, legend: true }
    }

    /// Draws the panel into `area`; a panel with nothing logged says so instead of drawing empty axes.
    pub fn draw(&self, area: &Area) -> DrawResult {
        let pts: Vec<&[(f64, f64)]> = self.lines.iter().map(|l| l.points.as_slice()).collect();
        let refs: Vec<(f64, f64)> = self.references.iter().map(|r| (self.x_range.0, r.y)).collect();
        let Some((lo, hi)) = extent(&[&pts[..], &[&refs[..]]].concat(), |p| p.1) else {
            let caption = area.titled(&self.title, ("sans-serif", 17))?;
            let (w, h) = caption.dim_in_pixel();
            caption.draw(&Text::new("not logged in this run", (w as i32 / 2 - 80, h as i32 / 2), ("sans-serif", 15).into_font().color(&RGBColor(120, 120, 120))))?;
            return Ok(());
        };
        let log = self.log_y.unwrap_or_else(|| self.y_range.is_none() && wants_log(lo, hi));
        let (x0, x1) = self.x_range;
        let mut b = ChartBuilder::on(area);
        b.caption(&self.title, ("sans-serif", 17)).margin(10).x_label_area_size(38).y_label_area_size(62);
        if log {
            let chart = b.build_cartesian_2d(x0..x1, (lo / 1.25..hi * 1.25).log_scale())?;
            self.fill(chart)
        } else {
            let (y0, y1) = self.y_range.unwrap_or_else(|| padded(lo, hi));
            let chart = b.build_cartesian_2d(x0..x1, y0..y1)?;
            self.fill(chart)
        }
    }

    fn fill<'a, Y>(&self, mut chart: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>) -> DrawResult
    where
        Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
    {
        let steps = matches!(self.x_axis, XAxis::Steps);
        let span = (self.x_range.1 - self.x_range.0).max(1.0);
        let x_fmt = |v: &f64| match self.x_axis {
            XAxis::Steps if (v - v.round()).abs() > 1e-6 => String::new(),
            XAxis::Steps => format!("{v:.0}"),
            XAxis::Count => si(*v),
        };
        chart
            .configure_mesh()
            .x_desc(self.x_desc.as_str())
            .y_desc(self.y_desc.as_str())
            .x_labels(if steps { (span as usize + 1).min(9) } else { 7 })
            .y_labels(6)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&|v: &f64| sci(*v))
            .light_line_style(RGBColor(240, 240, 240))
            .bold_line_style(RGBColor(215, 215, 215))
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 14))
            .draw()?;
        for r in &self.references {
            let style = ShapeStyle::from(&RGBColor(40, 40, 40)).stroke_width(2);
            let n = 80;
            let dash = (self.x_range.1 - self.x_range.0) / n as f64;
            chart
                .draw_series((0..n).step_by(2).map(|i| {
                    let x = self.x_range.0 + i as f64 * dash;
                    PathElement::new(vec![(x, r.y), (x + dash, r.y)], style)
                }))?
                .label(r.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 8, y)], style));
        }
        let (y0, y1) = self.y_range.unwrap_or((f64::NEG_INFINITY, f64::INFINITY));
        for l in &self.lines {
            let style = ShapeStyle::from(&l.color).stroke_width(2);
            // plotters pins points outside the axis to its edge; cut the line there instead
            let pieces = clip(&l.points, y0, y1);
            for (i, piece) in pieces.iter().enumerate() {
                let s = chart.draw_series(LineSeries::new(piece.iter().cloned(), style))?;
                if i == 0 {
                    s.label(l.name.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                }
            }
            if l.markers || l.points.len() <= 12 {
                chart.draw_series(l.points.iter().filter(|p| (y0..=y1).contains(&p.1)).map(|p| Circle::new(*p, 3, l.color.filled())))?;
            }
        }
        if self.legend && (self.lines.len() + self.references.len() > 1 || self.lines.iter().any(|l| !l.name.is_empty())) {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font(("sans-serif", 13))
                .draw()?;
        }
        Ok(())
    }
}

/// The pieces of the polyline `points` inside the band y0..=y1: each segment cut where it
/// crosses the band's edges, a new piece wherever the line leaves the band. A lone point inside
/// the band is a piece of one point.
pub(crate) fn clip(points: &[(f64, f64)], y0: f64, y1: f64) -> Vec<Vec<(f64, f64)>> {
    let inside = |p: &(f64, f64)| (y0..=y1).contains(&p.1);
    let mut pieces: Vec<Vec<(f64, f64)>> = vec![];
    let mut open = false; // whether the last piece ends at the last point
    if let Some(p) = points.first().filter(|p| inside(p)) {
        pieces.push(vec![*p]);
        open = true;
    }
    for w in points.windows(2) {
        let ((xa, ya), (xb, yb)) = (w[0], w[1]);
        // the part of the segment with y in the band, as t in 0..=1
        let (mut t0, mut t1) = (0.0f64, 1.0f64);
        if ya == yb {
            if !inside(&w[0]) {
                open = false;
                continue;
            }
        } else {
            let (ta, tb) = ((y0 - ya) / (yb - ya), (y1 - ya) / (yb - ya));
            t0 = t0.max(ta.min(tb));
            t1 = t1.min(ta.max(tb));
        }
        if t0 > t1 {
            open = false;
            continue;
        }
        let at = |t: f64| (xa + (xb - xa) * t, ya + (yb - ya) * t);
        if !(open && t0 == 0.0) {
            pieces.push(vec![at(t0)]);
        }
        pieces.last_mut().unwrap().push(at(t1));
        open = t1 == 1.0;
    }
    pieces
}

/// The x range of steps in `rows`: 0 to the last step (at least 1), so short runs get whole steps.
fn step_range(rows: &[serde_json::Value]) -> (f64, f64) {
    let last = rows.iter().filter_map(|r| r.get("step")?.as_f64()).fold(0.0, f64::max);
    (0.0, last.max(1.0))
}

/// Where to cut a loss axis so the start (a fall from ~ln V) does not flatten the rest: the
/// highest value after the first tenth of the run, when the start is well above it; with the
/// starting value, for the title. None when there is nothing to cut.
pub(crate) fn cut_start(lines: &[Line], last_step: f64) -> Option<(f64, f64)> {
    let all: Vec<(f64, f64)> = lines.iter().flat_map(|l| l.points.iter().cloned()).collect();
    let later: Vec<f64> = all.iter().filter(|p| p.0 >= 0.1 * last_step && p.0 > 0.0).map(|p| p.1).collect();
    let (lo, hi) = extent(&[&all], |p| p.1)?;
    let top = later.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let start = all.iter().min_by(|a, b| a.0.total_cmp(&b.0))?.1;
    (top.is_finite() && later.len() >= 2 && hi - top > 0.5 * (top - lo)).then_some((top, start))
}

/// The six panels of the training figure, in reading order.
pub(crate) fn training_panels(rows: &[serde_json::Value]) -> [Panel; 6] {
    let xr = step_range(rows);
    let mut loss = Panel::new("cross-entropy", "nats", XAxis::Steps, xr);
    loss.lines.push(Line::new("train", series(rows, "train.base_loss"), colour(0)));
    loss.lines.push(Line { markers: true, ..Line::new("validation", series(rows, "val.loss"), colour(1)) });
    loss.log_y = Some(false);
    if let Some((top, start)) = cut_start(&loss.lines, xr.1) {
        let lo = extent(&loss.lines.iter().map(|l| l.points.as_slice()).collect::<Vec<_>>(), |p| p.1).map_or(0.0, |e| e.0);
        loss.y_range = Some((lo - 0.05 * (top - lo), top + 0.1 * (top - lo)));
        loss.title = format!("cross-entropy (axis cut above {top:.2}; it starts at {start:.2})");
    }

    let mut aux = Panel::new("auxiliary losses (before their coefficients)", "", XAxis::Steps, xr);
    let mut keys: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.as_object())
        .flat_map(|o| o.keys().map(|k| k.as_str()))
        .filter(|k| k.starts_with("train.") && !matches!(*k, "train.loss" | "train.base_loss"))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    for (i, k) in keys.iter().enumerate() {
        aux.lines.push(Line::new(k.trim_start_matches("train."), series(rows, k), colour(i)));
    }

    let mut lr = Panel::new("learning rate", "", XAxis::Steps, xr);
    lr.log_y = Some(false);
    lr.lines.push(Line::new("", series(rows, "lr"), colour(2)));

    let mut grad = Panel::new("gradient norm (before clipping)", "L2 norm", XAxis::Steps, xr);
    for (i, (k, name)) in [("grad_norm", "all"), ("grad_norm.non_experts", "outside the experts"), ("grad_norm.experts", "routed experts")].iter().enumerate() {
        grad.lines.push(Line::new(*name, series(rows, k), colour(i)));
    }
    grad.lines.retain(|l| !l.points.is_empty());

    let mut acc = Panel::new("validation next-token accuracy", "fraction correct", XAxis::Steps, xr);
    acc.lines.push(Line { markers: true, ..Line::new("", series(rows, "val.accuracy"), colour(1)) });
    acc.log_y = Some(false);
    let best = acc.lines[0].points.iter().map(|p| p.1).fold(0.0, f64::max);
    acc.y_range = Some((0.0, (best * 1.15).max(0.01)));

    let mut speed = Panel::new("throughput", "tokens / s", XAxis::Steps, xr);
    speed.lines.push(Line::new("", series(rows, "tokens_per_s"), colour(4)));
    speed.log_y = Some(false);
    [loss, aux, lr, grad, acc, speed]
}

/// Writes the training figure (see the module docs) to `path`; `title` goes on top (e.g. the
/// experiment, preset and step count).
pub fn training_curves(rows: &[serde_json::Value], path: &Path, title: &str) -> Result<()> {
    font();
    let panels = training_panels(rows);
    let draw = || -> DrawResult {
        let root = BitMapBackend::new(path, (1500, 860)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 22))?;
        let cells = root.split_evenly((2, 3));
        for (panel, area) in panels.iter().zip(cells.iter()) {
            panel.draw(area)?;
        }
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
    fn tick_labels_are_short() {
        assert_eq!(si(50_000.0), "50k");
        assert_eq!(si(1_500_000.0), "1.5M");
        assert_eq!(si(2e9), "2G");
        assert_eq!(si(950.0), "950");
        assert_eq!(si(0.0), "0");
        assert_eq!(sci(3e-3), "3e-3");
        assert_eq!(sci(2.5e-4), "2.5e-4");
        assert_eq!(sci(0.5), "0.5");
        assert_eq!(sci(12.0), "12");
        assert_eq!(sci(5.55e-17), "0");
        assert_eq!(sci(-0.25), "-0.25");
    }

    #[test]
    fn a_constant_series_gets_an_axis_with_room() {
        let (lo, hi) = padded(6e-4, 6e-4);
        assert!(lo < 6e-4 && hi > 6e-4 && (hi - lo) > 1e-4, "{lo} {hi}");
        assert_eq!(padded(0.0, 0.0), (-0.5, 0.5));
        assert!(wants_log(0.01, 2.0) && !wants_log(5.0, 11.0) && !wants_log(0.0, 10.0));
    }

    #[test]
    fn lines_are_cut_where_they_leave_the_axis() {
        // falls from 10 into the band 0..=7, goes out above and comes back
        let pts = [(0.0, 10.0), (1.0, 6.0), (2.0, 5.0), (3.0, 9.0), (4.0, 5.0)];
        let pieces = clip(&pts, 0.0, 7.0);
        assert_eq!(pieces.len(), 2, "{pieces:?}");
        assert_eq!(pieces[0], vec![(0.75, 7.0), (1.0, 6.0), (2.0, 5.0), (2.5, 7.0)]);
        assert_eq!(pieces[1], vec![(3.5, 7.0), (4.0, 5.0)]);
        assert_eq!(clip(&pts, 0.0, 20.0), vec![pts.to_vec()], "nothing to cut");
        assert_eq!(clip(&[(0.0, 1.0)], 0.0, 2.0), vec![vec![(0.0, 1.0)]], "one point stays");
        assert!(clip(&[(0.0, 9.0), (1.0, 9.0)], 0.0, 2.0).is_empty());
    }

    fn rows_of(n: u64) -> Vec<serde_json::Value> {
        (0..=n)
            .map(|s| {
                let mut r = serde_json::json!({"step": s, "lr": 6e-4});
                if s > 0 {
                    r["train.base_loss"] = serde_json::json!(5.0 + 6.0 / s as f64);
                    r["train.aux_loss"] = serde_json::json!(1.0);
                    r["train.z_loss"] = serde_json::json!(2.0);
                    r["train.offset_penalty"] = serde_json::json!(0.01); // a loss an experiment adds
                    r["train.loss"] = serde_json::json!(99.0);
                }
                if s % 5 == 0 {
                    r["val.loss"] = serde_json::json!(5.0 + 6.0 / (s + 1) as f64);
                    r["val.accuracy"] = serde_json::json!(0.0);
                }
                r
            })
            .collect()
    }

    #[test]
    fn the_training_figure_shows_every_logged_loss() {
        let [loss, aux, lr, grad, acc, _] = training_panels(&rows_of(100));
        let names: Vec<&str> = aux.lines.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["aux_loss", "offset_penalty", "z_loss"], "every train.* term but the total and the cross-entropy");
        assert_eq!(loss.lines.iter().map(|l| l.points.len()).collect::<Vec<_>>(), [100, 21]);
        // train falls from 11 to ~5: the start is cut so the rest is readable, and the title says so
        let (_, top) = loss.y_range.expect("the loss axis is cut");
        assert!(top < 6.0, "{top}");
        assert!(loss.title.contains("starts at 11.00"), "{}", loss.title);
        assert_eq!(lr.lines[0].points.len(), 101);
        assert!(grad.lines.is_empty(), "nothing logged: the panel says so instead of drawing empty lines");
        assert_eq!(acc.y_range, Some((0.0, 0.01)), "accuracy 0 everywhere still gets an axis from 0");
    }

    #[test]
    fn a_short_run_keeps_its_start_and_draws() {
        let rows = rows_of(5);
        let [loss, ..] = training_panels(&rows);
        assert!(loss.y_range.is_none(), "too few points after the start to cut it");
        assert_eq!(step_range(&rows), (0.0, 5.0));
        assert_eq!(step_range(&rows[..1]), (0.0, 1.0), "step 0 alone still has an axis");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("curves.png");
        training_curves(&rows, &p, "5 steps").unwrap();
        assert_eq!(image::open(&p).unwrap().to_rgba8().dimensions(), (1500, 860));
    }

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
