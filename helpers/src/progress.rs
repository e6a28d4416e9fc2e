//! Progress for long jobs (downloads, tokenization): an indicatif bar in a terminal, and in a
//! notebook or a log file (where a bar would be invisible or garbage) one plain line every `every`
//! seconds and at the end: on stdout in a notebook (JupyterLab shows stderr in a red box, as an
//! error), on stderr elsewhere (a command's stdout stays its output, e.g. `data download`'s paths).
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    label: String,
    total: Option<u64>,
    pos: u64,
    unit: &'static str,
    msg: String,
    started: Instant,
    last: Instant,
    every: Duration,
}

impl Progress {
    /// `total` in `unit`s (e.g. "docs", "bytes") if known.
    pub fn new(label: &str, total: Option<u64>, unit: &'static str) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = terminal.then(|| {
            let bar = match total {
                Some(n) => ProgressBar::new(n),
                None => ProgressBar::new_spinner(),
            };
            let tpl = if unit == "bytes" {
                "{prefix} {bar:30} {bytes}/{total_bytes} [{elapsed_precise}<{eta_precise}] {bytes_per_sec} {msg}".to_string()
            } else {
                format!("{{prefix}} {{bar:30}} {{human_pos}}/{{human_len}} {unit} {{msg}} [{{elapsed_precise}}<{{eta_precise}}]")
            };
            bar.set_style(ProgressStyle::with_template(&tpl).unwrap_or_else(|_| ProgressStyle::default_bar()));
            bar.set_prefix(label.to_string());
            bar
        });
        let now = Instant::now();
        Self { bar, lines: !terminal, label: label.into(), total, pos: 0, unit, msg: String::new(), started: now, last: now, every: Duration::from_secs(10) }
    }

    /// Shows nothing.
    pub fn hidden() -> Self {
        let mut p = Self::new("", None, "");
        p.bar = None;
        p.lines = false;
        p
    }

    /// Moves to `pos` with a message (rates, counts; the unit is shown already).
    pub fn set(&mut self, pos: u64, msg: String) {
        self.pos = pos;
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.set_message(msg.clone());
        }
        self.msg = msg;
        if self.lines && self.last.elapsed() >= self.every {
            self.last = Instant::now();
            self.print();
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
        if self.lines {
            self.print();
        }
    }

    fn print(&self) {
        let secs = self.started.elapsed().as_secs_f64();
        let (pos, total) = if self.unit == "bytes" {
            (format!("{:.1} MB", self.pos as f64 / 1e6), self.total.map(|t| format!("{:.1} MB", t as f64 / 1e6)))
        } else {
            (self.pos.to_string(), self.total.map(|t| t.to_string()))
        };
        if std::env::var_os("EVCXR_IS_RUNTIME").is_some() {
            println!("{}", self.line(pos, total, secs));
        } else {
            eprintln!("{}", self.line(pos, total, secs));
        }
    }

    /// `label: 42 of 100 docs in 3s, <msg>`.
    fn line(&self, pos: String, total: Option<String>, secs: f64) -> String {
        let of = total.map(|t| format!(" of {t}")).unwrap_or_default();
        let unit = if self.unit == "bytes" { String::new() } else { format!(" {}", self.unit) };
        let msg = if self.msg.is_empty() { String::new() } else { format!(", {}", self.msg.trim_start_matches(", ")) };
        format!("{}: {pos}{of}{unit} in {secs:.0}s{msg}", self.label)
    }
}

/// hf-hub reports download progress through this.
impl hf_hub::api::Progress for Progress {
    fn init(&mut self, size: usize, filename: &str) {
        // Called again (with a fresh `update(offset)`) each time a transfer starts or resumes.
        if self.total.is_none() {
            *self = Progress::new(filename, Some(size as u64), "bytes");
        }
        self.pos = 0;
    }
    fn update(&mut self, size: usize) {
        let pos = self.pos + size as u64;
        let rate = pos as f64 / 1e6 / self.started.elapsed().as_secs_f64().max(1e-9);
        self.set(pos, if self.lines { format!("{rate:.1} MB/s") } else { String::new() });
    }
    fn finish(&mut self) {
        Progress::finish(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_line_names_the_unit_once() {
        let mut p = Progress::new("[1/1] a.parquet", Some(100), "docs");
        p.msg = "0.01M tokens, 12k tokens/s".into();
        assert_eq!(p.line("42".into(), Some("100".into()), 1.2), "[1/1] a.parquet: 42 of 100 docs in 1s, 0.01M tokens, 12k tokens/s");
        p.unit = "bytes";
        p.msg = String::new();
        assert_eq!(p.line("1.5 MB".into(), None, 3.0), "[1/1] a.parquet: 1.5 MB in 3s");
    }
}
