//! Sweeps: a grid over config fields, one headless notebook run per point, and the results of all
//! of them in one table and two plots, as in interpretable-moes' ablation studies (layers, experts, top-K).
//!
//! `bash setup.sh sweep --grid model.num_hidden_layers=2,4 --grid model.num_experts=4,8` runs the
//! four points (src/bin/sweep.rs spawns the notebooks); this module is everything around that:
//! - [`parse_grid`]: `section.field=v1,v2,...` into an [`Axis`]. Values are JSON or bare words, as
//!   in [`crate::Overrides`] (`MOE_SET`), which is how each point reaches the notebook.
//! - [`expand`]: the cartesian product, first axis slowest (nested `for` loops in grid order).
//!   [`Point::name`] is the run directory's name: `num_hidden_layers=2,num_experts=8`.
//! - [`collect`]: one [`Row`] per point from its run directory (`training_results.json`,
//!   `summary.json`, `metrics.jsonl`), with a status: ok, failed or missing.
//! - [`report`]: `results.csv`, `results.md` (a markdown table), `loss_vs_params.png` (final
//!   validation loss against total and active parameters) and `loss_vs_tokens.png` (validation
//!   loss curves against tokens trained), all in the sweep directory.
//!
//! A sweep directory: `sweep.json` (grid and settings, [`Sweep`]), then one run directory per point.
use crate::plot::{font, range};
use crate::WithCause;
use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The config sections a grid may sweep (the notebook's `ModelConfig` and `TrainConfig`).
pub const SECTIONS: &[&str] = &["model", "train"];

/// One swept field and its values, as typed (`"2"`, `"1e-3"`, `"muon"`): the exact text goes into
/// `MOE_SET`, so the notebook parses it the same way as a hand-written override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Axis {
    /// `section.field`, e.g. `model.num_hidden_layers`.
    pub key: String,
    pub values: Vec<String>,
}

/// Parses `section.field=v1,v2,...` (e.g. `model.num_hidden_layers=2,4`).
pub fn parse_axis(spec: &str) -> Result<Axis> {
    let example = "e.g. model.num_hidden_layers=2,4";
    let Some((key, list)) = spec.split_once('=') else { bail!("grid {spec:?} is not of the form section.field=v1,v2 ({example})") };
    let key = key.trim();
    let Some((section, field)) = key.split_once('.') else { bail!("grid {spec:?}: {key:?} needs a section prefix, one of {SECTIONS:?} ({example})") };
    if !SECTIONS.contains(&section) {
        bail!("grid {spec:?}: unknown config section {section:?}; expected one of {SECTIONS:?}");
    }
    if field.is_empty() || !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("grid {spec:?}: {field:?} is not a config field name");
    }
    let mut values: Vec<String> = Vec::new();
    for v in list.split(',').map(str::trim) {
        if v.is_empty() {
            bail!("grid {spec:?} has an empty value; list values separated by commas ({example})");
        }
        // MOE_SET separates assignments by whitespace and commas, so a value cannot hold either.
        if v.chars().any(char::is_whitespace) {
            bail!("grid {spec:?}: value {v:?} contains whitespace, which MOE_SET cannot carry");
        }
        if v.starts_with(['"', '[', '{']) && serde_json::from_str::<Value>(v).is_err() {
            bail!("grid {spec:?}: value {v:?} looks like JSON but does not parse (values cannot contain commas)");
        }
        if values.iter().any(|x| x == v) {
            bail!("grid {spec:?}: value {v} appears twice");
        }
        values.push(v.to_string());
    }
    Ok(Axis { key: key.to_string(), values })
}

/// Parses every `--grid` argument; the same field twice is an error.
pub fn parse_grid<S: AsRef<str>>(specs: &[S]) -> Result<Vec<Axis>> {
    let mut grid: Vec<Axis> = Vec::new();
    for spec in specs {
        let axis = parse_axis(spec.as_ref())?;
        if grid.iter().any(|a| a.key == axis.key) {
            bail!("{} appears in two grids; list all its values in one: {}=a,b,c", axis.key, axis.key);
        }
        grid.push(axis);
    }
    Ok(grid)
}

/// Checks the fixed overrides (`--set`) and that none of them is also swept (the grid's value
/// would silently win).
pub fn check_set(set: &str, grid: &[Axis]) -> Result<()> {
    let fixed = crate::Overrides::parse(set, SECTIONS).context("in --set")?;
    for (section, field, _) in &fixed.entries {
        let key = format!("{section}.{field}");
        if grid.iter().any(|a| a.key == key) {
            bail!("{key} is both in --set and in a --grid; drop one of them");
        }
    }
    Ok(())
}

/// One point of the grid: a value for each axis, in grid order.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// (`section.field`, value as typed).
    pub values: Vec<(String, String)>,
}

impl Point {
    /// The run's name and directory: `num_hidden_layers=2,num_experts=8` (the section is dropped
    /// unless two axes share a field name); characters other than letters, digits and `._+-=,`
    /// become `_`. The grid without axes has one point, `base`.
    pub fn name(&self) -> String {
        if self.values.is_empty() {
            return "base".into();
        }
        let field = |k: &str| k.split_once('.').map_or(k, |(_, f)| f).to_string();
        let parts: Vec<String> = self
            .values
            .iter()
            .map(|(k, v)| {
                let clash = self.values.iter().filter(|(k2, _)| field(k2) == field(k)).count() > 1;
                format!("{}={v}", if clash { k.clone() } else { field(k) })
            })
            .collect();
        parts.join(",").chars().map(|c| if c.is_ascii_alphanumeric() || "._+-=,".contains(c) { c } else { '_' }).collect()
    }

    /// The point as `MOE_SET` assignments: `model.num_hidden_layers=2 model.num_experts=8`.
    pub fn overrides(&self) -> String {
        self.values.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
    }
}

/// Every combination of the axes' values, first axis slowest: the order of nested `for` loops
/// over the grid as written, which is also the order of the runs and of the table's rows.
pub fn expand(grid: &[Axis]) -> Vec<Point> {
    let mut points = vec![Point { values: Vec::new() }];
    for axis in grid {
        points = points
            .into_iter()
            .flat_map(|p| {
                axis.values.iter().map(move |v| {
                    let mut values = p.values.clone();
                    values.push((axis.key.clone(), v.clone()));
                    Point { values }
                })
            })
            .collect();
    }
    points
}

/// `sweep.json`: what a sweep directory was made with, so it can be continued and reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    /// The W&B group of every run (`WANDB_RUN_GROUP`); each run is named `<group>/<run name>`.
    pub group: String,
    /// The notebook each point runs, relative to the project root where it is inside it.
    pub notebook: String,
    /// `MOE_PRESET` (None: the notebook's default).
    pub preset: Option<String>,
    /// `MOE_STEPS` (None: the preset's).
    pub steps: Option<i64>,
    /// Overrides every run gets (`MOE_SET`), before the point's own.
    pub set: String,
    pub grid: Vec<Axis>,
}

impl Sweep {
    pub fn points(&self) -> Vec<Point> {
        expand(&self.grid)
    }

    /// `MOE_SET` for `point`: the fixed overrides, then the point's.
    pub fn moe_set(&self, point: &Point) -> String {
        format!("{} {}", self.set.trim(), point.overrides()).trim().to_string()
    }

    /// Reads `<dir>/sweep.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("sweep.json");
        let text =
            std::fs::read_to_string(&path).with_cause(|| format!("cannot read {} (is {} a sweep directory?)", path.display(), dir.display()))?;
        serde_json::from_str(&text).with_cause(|| format!("cannot parse {}", path.display()))
    }

    /// Writes `<dir>/sweep.json`, with the run names listed for readers.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut v = serde_json::to_value(self)?;
        v["runs"] = self.points().iter().map(Point::name).collect();
        crate::run::RunDir::at(dir)?.write_json("sweep.json", &v)?;
        Ok(())
    }
}

/// What became of a point's run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `training_results.json` is there and the run did not exit with an error.
    Ok,
    /// The run directory exists without results (crashed, killed, still running), or the sweep
    /// recorded a non-zero exit in `sweep_run.json`.
    Failed,
    /// No run directory: not started yet.
    Missing,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Missing => "missing",
        })
    }
}

/// The sweep's record of one run, `<run dir>/sweep_run.json`, written when the notebook exits.
pub const RUN_RECORD: &str = "sweep_run.json";

/// One run's results: a row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub point: Point,
    pub status: Status,
    /// Total and active parameters (`summary.json`, the notebook's formula).
    pub parameters: Option<i64>,
    pub active_parameters: Option<i64>,
    /// Tokens trained (`training_results.json`).
    pub tokens: Option<i64>,
    /// The last logged training loss (with its auxiliary terms), validation loss and accuracy.
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    /// Training throughput of the last logged interval.
    pub tokens_per_s: Option<f64>,
    /// Seconds in the training loop (`summary.json`).
    pub train_seconds: Option<f64>,
    /// (tokens trained, validation loss) at every evaluation (`metrics.jsonl`).
    pub val_curve: Vec<(f64, f64)>,
}

/// [`range`], widened to at least +-0.5 around a single value (one run, or runs that tie), so
/// the axis never collapses.
fn span(points: &[&[(f64, f64)]], pick: impl Fn(&(f64, f64)) -> f64) -> (f64, f64) {
    let (lo, hi) = range(points, pick);
    if hi - lo < 1e-6 {
        let mid = (lo + hi) / 2.0;
        return (mid - 0.5, mid + 0.5);
    }
    (lo, hi)
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The row of `point`, whose run directory is `dir`. Files that are absent or do not parse leave
/// their fields empty; the status says whether the run finished.
pub fn collect_run(dir: &Path, point: &Point) -> Row {
    let results = read_json(&dir.join("training_results.json"));
    let summary = read_json(&dir.join("summary.json"));
    let exit_code = read_json(&dir.join(RUN_RECORD)).and_then(|r| r.get("exit_code")?.as_i64());
    let status = match (dir.is_dir(), &results, exit_code) {
        (false, _, _) => Status::Missing,
        (true, Some(_), None | Some(0)) => Status::Ok,
        _ => Status::Failed,
    };
    let fin = |k: &str| results.as_ref()?.get("final")?.get(k)?.as_f64();
    let sum_i = |k: &str| summary.as_ref()?.get(k)?.as_i64();
    let rows: Vec<Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default();
    let val_curve =
        rows.iter().filter_map(|r| Some((r.get("tokens")?.as_f64()?, r.get("val.loss")?.as_f64()?))).filter(|(_, y)| y.is_finite()).collect();
    Row {
        name: point.name(),
        point: point.clone(),
        status,
        parameters: sum_i("parameters"),
        active_parameters: sum_i("active_parameters"),
        tokens: results.as_ref().and_then(|r| r.get("tokens")?.as_i64()),
        train_loss: fin("train.loss"),
        val_loss: fin("val.loss"),
        val_accuracy: fin("val.accuracy"),
        tokens_per_s: fin("tokens_per_s"),
        train_seconds: summary.as_ref().and_then(|s| s.get("train_seconds")?.as_f64()),
        val_curve,
    }
}

/// One row per point of `sweep`, in grid order, from the run directories under `dir`.
pub fn collect(dir: &Path, sweep: &Sweep) -> Vec<Row> {
    sweep.points().iter().map(|p| collect_run(&dir.join(p.name()), p)).collect()
}

const COLUMNS: &[&str] =
    &["status", "parameters", "active_parameters", "tokens", "train_loss", "val_loss", "val_accuracy", "tokens_per_s", "train_seconds"];

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `results.csv`: run name, one column per axis (values as typed), then [`COLUMNS`] with plain
/// numbers (empty where unknown).
pub fn csv(grid: &[Axis], rows: &[Row]) -> String {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let mut out: Vec<String> =
        vec![std::iter::once("run").chain(grid.iter().map(|a| a.key.as_str())).chain(COLUMNS.iter().copied()).collect::<Vec<_>>().join(",")];
    for r in rows {
        let mut f: Vec<String> = vec![csv_field(&r.name)];
        f.extend(r.point.values.iter().map(|(_, v)| csv_field(v)));
        f.push(r.status.to_string());
        f.extend([r.parameters, r.active_parameters, r.tokens].map(|v| opt(v.map(|x| x.to_string()))));
        f.extend([r.train_loss, r.val_loss, r.val_accuracy, r.tokens_per_s, r.train_seconds].map(|v| opt(v.map(|x| x.to_string()))));
        out.push(f.join(","));
    }
    out.join("\n") + "\n"
}

/// `1.23M`, `45.6K`, `789` (with `d` = 2): counts with `d` decimals in millions and billions,
/// `d - 1` in thousands. The table uses 2, plot ticks 3 (a sweep's sizes can be close together).
fn human(n: i64, d: usize) -> String {
    let x = n as f64;
    match x.abs() {
        a if a >= 1e9 => format!("{:.d$}B", x / 1e9),
        a if a >= 1e6 => format!("{:.d$}M", x / 1e6),
        a if a >= 1e4 => format!("{:.*}K", d - 1, x / 1e3),
        _ => n.to_string(),
    }
}

/// `results.md`: a markdown table, one row per run, one column per axis (field names only).
pub fn markdown(grid: &[Axis], rows: &[Row]) -> String {
    let dash = || "-".to_string();
    let int = |v: Option<i64>| v.map(|n| human(n, 2)).unwrap_or_else(dash);
    let num = |v: Option<f64>, d: usize| v.map(|x| format!("{x:.d$}")).unwrap_or_else(dash);
    let head: Vec<String> = grid
        .iter()
        .map(|a| a.key.split_once('.').map_or(a.key.as_str(), |(_, f)| f).to_string())
        .chain(["status", "params", "active", "tokens", "train loss", "val loss", "val acc", "tok/s", "train s"].map(String::from))
        .collect();
    let mut lines = vec![format!("| {} |", head.join(" | ")), format!("|{}", "---|".repeat(head.len()))];
    for r in rows {
        let mut cells: Vec<String> = r.point.values.iter().map(|(_, v)| v.replace('|', "\\|")).collect();
        cells.push(r.status.to_string());
        cells.extend([int(r.parameters), int(r.active_parameters), int(r.tokens)]);
        cells.extend([num(r.train_loss, 4), num(r.val_loss, 4), num(r.val_accuracy, 3), num(r.tokens_per_s, 0), num(r.train_seconds, 1)]);
        lines.push(format!("| {} |", cells.join(" | ")));
    }
    lines.join("\n") + "\n"
}

/// `loss_vs_params.png` (1200x480): final validation loss against total (left) and active
/// (right) parameters, log-x, one labelled point per finished run.
pub fn plot_loss_vs_params(rows: &[Row], path: &Path, title: &str) -> Result<()> {
    font();
    let pts = |active: bool| -> Vec<(f64, f64, String)> {
        rows.iter()
            .filter(|r| r.status == Status::Ok)
            .filter_map(|r| Some(((if active { r.active_parameters } else { r.parameters })? as f64, r.val_loss?, r.name.clone())))
            .filter(|(x, y, _)| *x > 0.0 && y.is_finite())
            .collect()
    };
    let (total, active) = (pts(false), pts(true));
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 22))?;
        let (left, right) = root.split_horizontally(600);
        for (area, points, what) in [(&left, &total, "total parameters"), (&right, &active, "active parameters")] {
            // The x axis is linear in ln(parameters), labelled with the parameter counts: plotters'
            // log axis puts ticks only at powers of ten, and a sweep often spans less than one.
            let xy: Vec<(f64, f64)> = points.iter().map(|(x, y, _)| (x.ln(), *y)).collect();
            let (x0, x1) = if xy.is_empty() { (1e5f64.ln(), 1e7f64.ln()) } else { span(&[&xy], |p| p.0) };
            let (y0, y1) = span(&[&xy], |p| p.1);
            let mut c = ChartBuilder::on(area)
                .caption(format!("final validation loss vs {what}"), ("sans-serif", 18))
                .margin(16)
                .x_label_area_size(36)
                .y_label_area_size(72)
                .build_cartesian_2d(x0..x1, y0..y1)?;
            c.configure_mesh()
                .x_desc(format!("{what} (log scale)"))
                .y_desc("validation loss (nats)")
                .x_label_formatter(&|v| human(v.exp().round() as i64, 3))
                .label_style(("sans-serif", 13))
                .draw()?;
            // Labels of points in the right half end at the point, so they stay inside the plot.
            let mid = (x0 + x1) / 2.0;
            c.draw_series(xy.iter().zip(points).map(|(&(x, y), (_, _, name))| {
                let (anchor, dx) = if x > mid { (HPos::Right, -6) } else { (HPos::Left, 6) };
                let style = TextStyle::from(("sans-serif", 12).into_font()).color(&BLACK).pos(Pos::new(anchor, VPos::Bottom));
                EmptyElement::at((x, y)) + Circle::new((0, 0), 4, BLUE.filled()) + Text::new(name.clone(), (dx, -4), style)
            }))?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{e}")).with_cause(|| format!("cannot draw {}", path.display()))
}

/// `loss_vs_tokens.png` (960x540): validation loss against tokens trained, one line per run
/// (failed runs too, as far as they got), with a legend.
pub fn plot_loss_vs_tokens(rows: &[Row], path: &Path, title: &str) -> Result<()> {
    font();
    let curves: Vec<(&Row, &[(f64, f64)])> = rows.iter().filter(|r| !r.val_curve.is_empty()).map(|r| (r, r.val_curve.as_slice())).collect();
    let all: Vec<&[(f64, f64)]> = curves.iter().map(|c| c.1).collect();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 22))?;
        let (x0, x1) = span(&all, |p| p.0);
        let (y0, y1) = span(&all, |p| p.1);
        let mut c = ChartBuilder::on(&root)
            .caption("validation loss vs tokens trained", ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(36)
            .y_label_area_size(72)
            .build_cartesian_2d(x0.max(0.0)..x1, y0..y1)?;
        c.configure_mesh()
            .x_desc("tokens trained")
            .y_desc("validation loss (nats)")
            .x_label_formatter(&|v| human(*v as i64, 3))
            .label_style(("sans-serif", 13))
            .draw()?;
        for (i, (r, pts)) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let label = if r.status == Status::Ok { r.name.clone() } else { format!("{} ({})", r.name, r.status) };
            c.draw_series(LineSeries::new(pts.iter().cloned(), color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            c.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
        c.configure_series_labels().background_style(WHITE).border_style(BLACK).label_font(("sans-serif", 14)).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{e}")).with_cause(|| format!("cannot draw {}", path.display()))
}

/// What [`report`] wrote.
#[derive(Debug)]
pub struct Report {
    pub rows: Vec<Row>,
    /// The markdown table (also in `results.md`).
    pub table: String,
    /// results.csv, results.md, loss_vs_params.png, loss_vs_tokens.png.
    pub files: Vec<PathBuf>,
}

/// Collects the sweep in `dir` (its `sweep.json` and run directories) into `results.csv`,
/// `results.md`, `loss_vs_params.png` and `loss_vs_tokens.png` there.
pub fn report(dir: &Path) -> Result<Report> {
    let sweep = Sweep::load(dir)?;
    let rows = collect(dir, &sweep);
    let table = markdown(&sweep.grid, &rows);
    let files: Vec<PathBuf> = ["results.csv", "results.md", "loss_vs_params.png", "loss_vs_tokens.png"].iter().map(|f| dir.join(f)).collect();
    crate::run::write_atomic(&files[0], csv(&sweep.grid, &rows).as_bytes())?;
    crate::run::write_atomic(&files[1], table.as_bytes())?;
    let ok = rows.iter().filter(|r| r.status == Status::Ok).count();
    let title = format!("sweep {}: {ok} of {} runs", sweep.group, rows.len());
    plot_loss_vs_params(&rows, &files[2], &title)?;
    plot_loss_vs_tokens(&rows, &files[3], &title)?;
    Ok(Report { rows, table, files })
}
