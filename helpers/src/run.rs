//! Run directories: where a run's config, metrics and weights go.
//!
//! A run directory holds `config.json` (both config structs), `metrics.jsonl` (one JSON object per
//! logged step, flushed as it is written so a crash loses nothing already logged) and
//! `model.safetensors` (written by the notebook's saving cell).
//!
//! In a launch of several processes only rank 0 writes: on the other ranks (RANK > 0) a run
//! directory is read-only, its writes do nothing and its logs discard their rows, so the training
//! loop is written once for one process and for many. Every rank must name the same directory
//! (`MOE_RUN_DIR`, which `bash setup.sh launch` sets).
use crate::WithCause;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The project root: the nearest ancestor of the current directory holding both `helpers/` and
/// `experiments/`. Notebooks run with their own folder as the current directory.
pub fn project_root() -> Result<PathBuf> {
    let cwd = std::env::current_dir()?;
    cwd.ancestors()
        .find(|d| d.join("helpers").is_dir() && d.join("experiments").is_dir())
        .map(Path::to_path_buf)
        .with_context(|| format!("{} is not inside the project (no ancestor has helpers/ and experiments/)", cwd.display()))
}

/// `path` for a message: relative to the project root when it is inside it
/// (`runs/base-olmoe/20261203-082534`), else as it is.
pub fn rel(path: &Path) -> String {
    let shown = project_root().ok().and_then(|root| path.strip_prefix(&root).ok().map(Path::to_path_buf));
    shown.unwrap_or_else(|| path.to_path_buf()).display().to_string()
}

/// A run's output directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
    /// False on ranks other than 0 of a launch: nothing is written (see the module docs).
    pub writes: bool,
}

/// This process's rank in a launch (torchrun's RANK), 0 without one.
pub fn launch_rank() -> usize {
    std::env::var("RANK").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// True in a launch of several processes (torchrun's WORLD_SIZE > 1).
pub fn in_launch() -> bool {
    std::env::var("WORLD_SIZE").ok().and_then(|s| s.trim().parse::<usize>().ok()).is_some_and(|w| w > 1)
}

/// The experiment a run belongs to, which names its folder under `runs/`: `$MOE_EXPERIMENT` (a
/// program built from a notebook sets it to the notebook's folder), else the folder of
/// `experiments/<name>/` the process runs in (the kernel runs in the notebook's folder, so a copy of
/// an experiment gets its own name without editing it), else `fallback`.
pub fn experiment_name(fallback: &str) -> String {
    if let Ok(name) = std::env::var("MOE_EXPERIMENT") {
        if !name.trim().is_empty() {
            return name.trim().to_string();
        }
    }
    let cwd = std::env::current_dir().ok();
    cwd.as_deref().and_then(experiment_of).unwrap_or_else(|| fallback.to_string())
}

/// `name` when `dir` is `<project>/experiments/<name>` or inside it.
fn experiment_of(dir: &Path) -> Option<String> {
    let mut child = None;
    for d in dir.ancestors() {
        if d.file_name().is_some_and(|n| n == "experiments") && d.parent().is_some_and(|p| p.join("helpers").is_dir()) {
            return child.and_then(|c: &Path| c.file_name()).map(|n| n.to_string_lossy().into_owned());
        }
        child = Some(d);
    }
    None
}

impl RunDir {
    /// Uses `$MOE_RUN_DIR` if set, else `<project>/runs/<experiment>/<UTC timestamp>` with the
    /// experiment named by [`experiment_name`] (`experiment` being the fallback); creates it.
    pub fn create(experiment: &str) -> Result<Self> {
        let path = match std::env::var("MOE_RUN_DIR") {
            Ok(p) if !p.trim().is_empty() => PathBuf::from(p),
            _ if in_launch() => anyhow::bail!("a launch of several processes needs MOE_RUN_DIR (one directory for every rank; bash setup.sh launch sets it)"),
            _ => project_root()?.join("runs").join(experiment_name(experiment)).join(utc_timestamp()),
        };
        Self::at(path)
    }

    /// Creates (if needed) and uses `path` (read-only on ranks other than 0 of a launch).
    pub fn at(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let writes = launch_rank() == 0;
        if writes {
            std::fs::create_dir_all(&path)
                .with_cause(|| format!("cannot create run directory {}; set MOE_RUN_DIR to a writable place", path.display()))?;
        }
        Ok(Self { path, writes })
    }

    /// `<run>/<name>`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `value` as pretty JSON to `<run>/<name>`, atomically.
    pub fn write_json(&self, name: &str, value: &impl Serialize) -> Result<PathBuf> {
        let p = self.file(name);
        if !self.writes {
            return Ok(p);
        }
        let mut s = serde_json::to_string_pretty(value)?;
        s.push('\n');
        write_atomic(&p, s.as_bytes())?;
        Ok(p)
    }

    /// Opens `<run>/metrics.jsonl` for appending.
    pub fn metrics(&self) -> Result<MetricsLog> {
        self.log("metrics.jsonl")
    }

    /// Opens `<run>/<name>` (JSONL) for appending; a log that discards its rows where this
    /// process does not write.
    pub fn log(&self, name: &str) -> Result<MetricsLog> {
        if !self.writes {
            return Ok(MetricsLog { file: None, path: self.file(name) });
        }
        MetricsLog::open(self.file(name))
    }

    /// Every row of `<run>/metrics.jsonl` (empty if there is none), e.g. for plots and results.
    pub fn read_metrics(&self) -> Result<Vec<serde_json::Value>> {
        let path = self.file("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(Vec::new()) };
        Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }

    /// Opens `<run>/metrics.jsonl` to continue a run resumed after optimizer step `step`: rows of
    /// later steps (logged by the run that crashed after its last checkpoint) are dropped first, so
    /// the file reads as if the run had never stopped.
    pub fn metrics_resumed(&self, step: i64) -> Result<MetricsLog> {
        self.jsonl_resumed("metrics.jsonl", step)
    }

    /// Like [`Self::metrics_resumed`] for any JSONL log of the run whose rows carry a `step`
    /// (e.g. `expert_usage.jsonl`).
    pub fn jsonl_resumed(&self, name: &str, step: i64) -> Result<MetricsLog> {
        let path = self.file(name);
        if !self.writes {
            return self.log(name);
        }
        if path.is_file() {
            let text = std::fs::read_to_string(&path).with_cause(|| format!("cannot read {}", path.display()))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    let step_of = serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step").and_then(|s| s.as_i64()));
                    // A torn last line (killed mid-write) has no parsable step: drop it too.
                    matches!(step_of, Some(s) if s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            write_atomic(&path, kept.as_bytes())?;
        }
        MetricsLog::open(path)
    }
}

/// An append-only JSONL file, one object per logged step, flushed on every row.
pub struct MetricsLog {
    file: Option<File>, // None: rows are discarded (a rank other than 0)
    pub path: PathBuf,
}

impl MetricsLog {
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_cause(|| format!("cannot open {} for appending", path.display()))?;
        Ok(Self { file: Some(file), path })
    }

    /// Appends one row. `row` must serialise to a JSON object.
    pub fn log(&mut self, row: &impl Serialize) -> Result<()> {
        let Some(file) = &mut self.file else { return Ok(()) };
        let v = serde_json::to_value(row)?;
        anyhow::ensure!(v.is_object(), "a metrics row must be a JSON object, got {v}");
        let mut line = serde_json::to_string(&v)?;
        line.push('\n');
        // One write call per row, so a crash leaves whole lines only (O_APPEND).
        file.write_all(line.as_bytes())
            .and_then(|_| file.flush())
            .with_cause(|| format!("cannot write to {}", self.path.display()))
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// crash or kill mid-write never leaves a truncated file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().context("path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_cause(|| format!("cannot write {}", path.display()))
}

/// `YYYYMMDD-HHMMSS` in UTC, for run directory names.
pub fn utc_timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

/// `1h02m`, `3m05s`, `42s`: for ETAs in progress lines.
pub fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_show_paths_inside_the_project_relative_to_it() {
        let root = project_root().unwrap(); // the tests run in helpers/
        assert_eq!(rel(&root.join("runs/base-olmoe/x")), "runs/base-olmoe/x");
        assert_eq!(rel(Path::new("/elsewhere/run")), "/elsewhere/run");
    }

    #[test]
    fn the_experiment_is_the_folder_under_experiments() {
        let tmp = std::env::temp_dir().join(format!("moe-run-test-{}", std::process::id()));
        for d in ["helpers", "experiments/my-idea/sub"] {
            std::fs::create_dir_all(tmp.join(d)).unwrap();
        }
        assert_eq!(experiment_of(&tmp.join("experiments/my-idea")).as_deref(), Some("my-idea"));
        assert_eq!(experiment_of(&tmp.join("experiments/my-idea/sub")).as_deref(), Some("my-idea"));
        assert_eq!(experiment_of(&tmp.join("experiments")), None);
        assert_eq!(experiment_of(&tmp), None);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
