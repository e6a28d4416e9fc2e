//! The local spool: every record a run produces, appended as one JSON line to
//! `<run>/wandb/spool.jsonl` before anything goes on the network. The uploader sends from it, so an
//! outage, a crash or offline mode loses nothing, and `sync` replays it later with the same code.
//! It never holds the API key.
//!
//! History rows and summary values are kept as JSON text in W&B's dialect (bare `NaN`, `Infinity`,
//! `-Infinity`), which serde_json cannot represent as values.
use crate::WithCause;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One metric value. Floats keep NaN and infinities, which W&B accepts and JSON does not.
#[derive(Debug, Clone, PartialEq)]
pub enum Metric {
    Float(f64),
    Int(i64),
    Json(serde_json::Value),
}

impl From<f64> for Metric {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}
impl From<f32> for Metric {
    fn from(v: f32) -> Self {
        Self::Float(v as f64)
    }
}
impl From<i64> for Metric {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<&str> for Metric {
    fn from(v: &str) -> Self {
        Self::Json(v.into())
    }
}
impl From<bool> for Metric {
    fn from(v: bool) -> Self {
        Self::Json(v.into())
    }
}
/// A JSON value as a metric. JSON has no NaN or infinity, and serde_json's `json!` writes a
/// non-finite `f64` as `null`, so a `null` (a diverged loss, a metric undefined for the last layer)
/// goes to W&B as NaN, which it charts as a gap, as the official client sends a NaN; a row that
/// must keep an infinity's sign uses [`Row::with`].
impl From<serde_json::Value> for Metric {
    fn from(v: serde_json::Value) -> Self {
        match &v {
            serde_json::Value::Null => Self::Float(f64::NAN),
            serde_json::Value::Number(n) if n.is_i64() => Self::Int(n.as_i64().unwrap()),
            serde_json::Value::Number(n) => Self::Float(n.as_f64().unwrap_or(f64::NAN)),
            _ => Self::Json(v),
        }
    }
}

impl Metric {
    /// JSON text as W&B writes it.
    pub fn to_json_text(&self) -> String {
        match self {
            Self::Float(f) if f.is_nan() => "NaN".into(),
            Self::Float(f) if f.is_infinite() => if *f > 0.0 { "Infinity".into() } else { "-Infinity".into() },
            Self::Float(f) => serde_json::to_string(f).unwrap(),
            Self::Int(i) => i.to_string(),
            Self::Json(v) => serde_json::to_string(v).unwrap(),
        }
    }
}

/// A row of metrics: flat keys (`train.loss`) to values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row(pub BTreeMap<String, Metric>);

impl Row {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds `key = value` (builder style): `Row::new().with("loss", f64::NAN)`.
    pub fn with(mut self, key: &str, value: impl Into<Metric>) -> Self {
        self.0.insert(key.to_string(), value.into());
        self
    }
    /// A JSON object, nested objects flattened with `.` (`{"train": {"loss": 1}}` -> `train.loss`).
    pub fn from_json(v: &serde_json::Value) -> Self {
        fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, Metric>) {
            match v {
                serde_json::Value::Object(m) if !m.is_empty() => {
                    for (k, v) in m {
                        walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
                    }
                }
                _ if !prefix.is_empty() => {
                    out.insert(prefix.to_string(), v.clone().into());
                }
                _ => {}
            }
        }
        let mut out = BTreeMap::new();
        walk("", v, &mut out);
        Self(out)
    }
    /// `{"k": v, ...}` in W&B's JSON dialect.
    pub fn to_json_text(&self) -> String {
        object_text(self.0.iter().map(|(k, v)| (k.as_str(), v.to_json_text())))
    }
}

/// `{"k": <raw>, ...}` from keys and raw JSON texts.
pub fn object_text<'a>(entries: impl Iterator<Item = (&'a str, String)>) -> String {
    let body: Vec<String> = entries.map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap())).collect();
    format!("{{{}}}", body.join(","))
}

/// A history line being formed: its step, the process (run record) that logged it, its values.
#[derive(Debug, Clone)]
pub struct Line<T> {
    pub step: i64,
    pub process: u32,
    pub values: T,
}

/// Adds a row to the lines not yet sent, as the uploader forms lines: a row of the newest line's
/// step (from the same process) merges into it (`merge`), and a resumed process's rows replace the
/// lines an earlier process left for the same or later steps. Returns the change in line count.
pub fn add_row<T>(lines: &mut VecDeque<Line<T>>, row: Line<T>, merge: impl FnOnce(&mut T, T)) -> isize {
    let mut change = 0;
    while lines.back().is_some_and(|l| l.step >= row.step && l.process != row.process) {
        lines.pop_back();
        change -= 1;
    }
    match lines.back_mut() {
        Some(l) if l.step == row.step => merge(&mut l.values, row.values),
        _ => {
            lines.push_back(row);
            change += 1;
        }
    }
    change
}

/// The history lines a spool's records make ([`add_row`] over all of them).
pub fn history_lines(records: &[Record]) -> usize {
    let (mut lines, mut process) = (VecDeque::new(), 0);
    for r in records {
        match r {
            Record::Run(_) => process += 1,
            Record::History { step, .. } => {
                add_row(&mut lines, Line { step: *step, process, values: () }, |_, _| {});
            }
            _ => {}
        }
    }
    lines.len()
}

/// What is spooled. Field names are short because a long run writes many history lines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    /// The run's identity and config (written at start; a resumed process appends another).
    Run(RunInfo),
    /// One history row (`_step`, `_runtime`, `_timestamp` included): key -> raw JSON text.
    History { step: i64, values: BTreeMap<String, String> },
    /// Summary values to merge (key -> raw JSON text).
    Summary { values: BTreeMap<String, String> },
    /// A file to upload, snapshotted under `<run>/wandb/files/<name>`.
    File { name: String },
    /// The process is going away (SIGTERM): W&B shows the run as preempting until it finishes or
    /// a resumed process continues it.
    Preempting,
    /// The run ended with this exit code.
    Finish { exitcode: i32 },
}

/// Everything UpsertBucket needs, except the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub id: String,
    pub entity: Option<String>,
    pub project: String,
    pub display_name: Option<String>,
    pub notes: Option<String>,
    pub tags: Vec<String>,
    pub group: Option<String>,
    pub job_type: Option<String>,
    pub host: Option<String>,
    pub program: Option<String>,
    pub commit: Option<String>,
    /// The run's config as given (the uploader wraps each key as `{"value": v}`).
    pub config: serde_json::Value,
    /// This process resumes an existing run (history continues after the server's last step).
    pub resumed: bool,
}

/// Appends records to a spool file, one flushed line each.
pub struct SpoolWriter {
    file: std::fs::File,
    pub path: PathBuf,
}

impl SpoolWriter {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).with_cause(|| format!("cannot create {}", d.display()))?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).with_cause(|| format!("cannot open {}", path.display()))?;
        Ok(Self { file, path: path.to_path_buf() })
    }
    pub fn append(&mut self, r: &Record) -> Result<()> {
        let mut line = serde_json::to_string(r)?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush()).with_cause(|| format!("cannot write {}", self.path.display()))
    }
}

/// Reads the records appended since the last call (whole lines only: a line still being written,
/// or torn by a crash, is left for later or skipped).
pub struct SpoolReader {
    pub path: PathBuf,
    pos: u64,
}

impl SpoolReader {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), pos: 0 }
    }
    pub fn read_new(&mut self) -> Result<Vec<Record>> {
        let Ok(mut f) = std::fs::File::open(&self.path) else { return Ok(Vec::new()) };
        f.seek(SeekFrom::Start(self.pos))?;
        let mut reader = std::io::BufReader::new(f);
        let mut out = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                break; // end, or a partial line still being written
            }
            self.pos += n as u64;
            if let Ok(r) = serde_json::from_str::<Record>(line.trim_end()) {
                out.push(r);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_flatten_and_write_nan_as_wandb_does() {
        let row = Row::from_json(&serde_json::json!({"train": {"loss": 1.5, "n": 3}, "ok": true, "name": "x"}))
            .with("bad", f64::NAN)
            .with("up", f64::INFINITY)
            .with("down", f64::NEG_INFINITY);
        assert_eq!(row.to_json_text(), r#"{"bad":NaN,"down":-Infinity,"name":"x","ok":true,"train.loss":1.5,"train.n":3,"up":Infinity}"#);
    }
}
