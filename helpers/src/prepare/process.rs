//! Tokenize documents into token shards, in parallel on all cores, restartable.
//!
//! Output directory:
//! ```text
//! <out>/manifest.json          settings, inputs in order, per-shard counts
//! <out>/val/val.bin            the held-out validation shard: the first documents of the first input
//! <out>/train/00000-<stem>.bin one training shard per input file (the rest of the first input's
//! <out>/train/00001-<stem>.bin documents go to 00000)
//! ```
//! Each input becomes one shard, written as `.tmp` and renamed when complete, so a rerun skips the
//! finished ones, redoes one left half-written by a crash, and picks up input files added since.
//! A lock on `<out>/.lock` keeps a second process from writing the same shards at the same time.
use super::source::{Documents, Filter};
use crate::progress::Progress;
use crate::shards::{self, Shard, ShardWriter};
use crate::WithCause;
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a shard directory's contents depend on; a rerun with other settings is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// FNV-1a of the tokenizer.json bytes (also in every shard header).
    pub tokenizer: String,
    pub text_column: String,
    pub filter: Filter,
    /// Tokens (whole documents, at least this many) held out for validation from the first input.
    pub val_tokens: u64,
}

/// A processing job. `Process::new(inputs, out_dir, tokenizer)` gives the defaults.
#[derive(Clone, Debug)]
pub struct Process {
    /// Files or directories (see [`super::input_files`]), in the order they become shards.
    pub inputs: Vec<PathBuf>,
    pub out_dir: PathBuf,
    /// A `tokenizer.json` (see [`super::tokenizer_file`] for hub ids and the default).
    pub tokenizer: PathBuf,
    /// The text column (parquet) or field (JSONL); FineWeb-Edu's is `text`.
    pub text_column: String,
    pub filter: Filter,
    pub val_tokens: u64,
    /// Documents per tokenizer call (each call runs on all cores).
    pub batch_docs: usize,
    /// Show a progress bar (documents, tokens/s, MB/s).
    pub progress: bool,
}

/// What a run did. `tokens`, `text_bytes` and `seconds` count only the work done in this run
/// (skipped shards excluded), so the rates are this machine's.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub out_dir: PathBuf,
    pub files: usize,
    pub skipped_files: usize,
    pub docs_read: u64,
    pub docs_kept: u64,
    pub tokens: u64,
    pub val_tokens: u64,
    pub text_bytes: u64,
    pub seconds: f64,
    /// Training tokens in the whole directory (this run's and earlier runs').
    pub total_train_tokens: u64,
}

impl Summary {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
    pub fn mb_per_s(&self) -> f64 {
        self.text_bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} input file(s), {} already done; this run tokenized {} of {} documents into {} tokens ({} validation) in {:.2}s: {:.0} tokens/s, {:.2} MB of text/s; {} training tokens in all",
            self.out_dir.display(),
            self.files,
            self.skipped_files,
            self.docs_kept,
            self.docs_read,
            self.tokens,
            self.val_tokens,
            self.seconds,
            self.tokens_per_s(),
            self.mb_per_s(),
            self.total_train_tokens
        )
    }
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    settings: Settings,
    /// Input file names, in shard order.
    inputs: Vec<String>,
}

/// An exclusive lock on `<dir>/.lock`, held while the returned file is open (released by the
/// kernel if the process dies). Waits, saying so, while another process holds it.
fn lock_dir(dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_cause(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(".lock");
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)
        .with_cause(|| format!("cannot open {}", path.display()))?;
    if f.try_lock().is_err() {
        println!("{}: another process is preparing these shards; waiting for it", dir.display());
        f.lock().with_cause(|| format!("cannot lock {}", path.display()))?;
    }
    Ok(f)
}

impl Process {
    pub fn new(inputs: Vec<PathBuf>, out_dir: impl Into<PathBuf>, tokenizer: impl Into<PathBuf>) -> Self {
        Self {
            inputs,
            out_dir: out_dir.into(),
            tokenizer: tokenizer.into(),
            text_column: "text".into(),
            filter: Filter::default(),
            val_tokens: 1 << 20,
            batch_docs: 1024,
            progress: true,
        }
    }

    /// The training shards' directory.
    pub fn train_dir(&self) -> PathBuf {
        self.out_dir.join("train")
    }

    /// The validation shards' directory.
    pub fn val_dir(&self) -> PathBuf {
        self.out_dir.join("val")
    }

    /// Runs the job; see the module docs for what is skipped and redone. Two processes preparing
    /// one directory at once (two notebooks started together, two test workers) take turns: the
    /// second waits for the first, then finds its shards done.
    pub fn run(&self) -> Result<Summary> {
        let _lock = lock_dir(&self.out_dir)?;
        let files = super::source::input_files(&self.inputs)?;
        let tok = crate::data::Tokenizer::from_file(&self.tokenizer)?;
        let tok_bytes = std::fs::read(&self.tokenizer).with_cause(|| format!("cannot read {}", self.tokenizer.display()))?;
        let identity = shards::fnv1a(&tok_bytes);
        let settings = Settings {
            tokenizer: format!("{identity:016x}"),
            text_column: self.text_column.clone(),
            filter: self.filter.clone(),
            val_tokens: self.val_tokens,
        };
        let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
        self.check_manifest(&settings, &names)?;

        let mut sum = Summary { out_dir: self.out_dir.clone(), files: files.len(), ..Default::default() };
        let t0 = Instant::now();
        for (i, file) in files.iter().enumerate() {
            let stem = file.file_stem().unwrap_or_default().to_string_lossy();
            let train = self.train_dir().join(format!("{i:05}-{stem}.bin"));
            let val = (i == 0).then(|| self.val_dir().join("val.bin"));
            let mut outputs = vec![train.clone()];
            outputs.extend(val.clone());
            if outputs.iter().all(|p| done(p, identity)) {
                sum.skipped_files += 1;
                continue;
            }
            for p in &outputs {
                let tmp = p.with_extension("tmp");
                if tmp.exists() {
                    eprintln!("{} was left half-written by an interrupted run; redoing it", tmp.display());
                }
                if p.exists() {
                    std::fs::remove_file(p).with_cause(|| format!("cannot remove {}", p.display()))?;
                }
            }
            self.tokenize_file(file, &tok, identity, &train, val.as_deref(), i, files.len(), &mut sum)?;
        }
        sum.seconds = t0.elapsed().as_secs_f64();
        sum.total_train_tokens = shards::open_dir(&self.train_dir(), Some(identity))?.iter().map(|s| s.n_tokens).sum();
        Ok(sum)
    }

    fn check_manifest(&self, settings: &Settings, names: &[String]) -> Result<()> {
        let path = self.out_dir.join("manifest.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let old: Manifest =
                serde_json::from_str(&text).with_cause(|| format!("{} is damaged; delete the directory and process again", path.display()))?;
            ensure!(
                old.settings == *settings,
                "{} holds shards made with other settings ({} vs now {}); use another output directory, or delete it to start over",
                self.out_dir.display(),
                serde_json::to_string(&old.settings)?,
                serde_json::to_string(settings)?
            );
            for (i, (a, b)) in old.inputs.iter().zip(names).enumerate() {
                ensure!(
                    a == b,
                    "{}: input {i} was {a} and is now {b}; inputs must keep their order (new files can only be appended)",
                    self.out_dir.display()
                );
            }
        }
        let m = Manifest { format: 1, settings: settings.clone(), inputs: names.to_vec() };
        std::fs::create_dir_all(&self.out_dir).with_cause(|| format!("cannot create {}", self.out_dir.display()))?;
        crate::run::write_atomic(&path, serde_json::to_string_pretty(&m)?.as_bytes())
    }

    #[allow(clippy::too_many_arguments)]
    fn tokenize_file(
        &self,
        file: &Path,
        tok: &crate::data::Tokenizer,
        identity: u64,
        train: &Path,
        val: Option<&Path>,
        index: usize,
        n_files: usize,
        sum: &mut Summary,
    ) -> Result<()> {
        let mut docs = Documents::open(file, &self.text_column, &self.filter)?;
        let label = format!("[{}/{n_files}] {}", index + 1, file.file_name().unwrap_or_default().to_string_lossy());
        let mut bar = if self.progress { Progress::new(&label, docs.rows(), "docs") } else { Progress::hidden() };
        let mut train_w = ShardWriter::create(train, tok.vocab_size, identity)?;
        let mut val_w = val.map(|v| ShardWriter::create(v, tok.vocab_size, identity)).transpose()?;
        let (mut val_tokens, eos) = (0u64, tok.eos_id as u32);
        let t0 = Instant::now();
        let (mut tokens, mut bytes) = (0u64, 0u64);
        // Reading (decompressing, decoding) overlaps with tokenizing: a reader thread keeps two
        // batches ready while the tokenizer runs on every core.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(Vec<String>, u64)>>(2);
        let (batch_docs, docs_before) = (self.batch_docs.max(1), sum.docs_read);
        std::thread::scope(|scope| -> Result<()> {
            scope.spawn(move || loop {
                // A batch (a row group, or JSONL lines) with the documents read so far.
                match docs.next_batch() {
                    Ok(None) => return,
                    Ok(Some(batch)) => {
                        if tx.send(Ok((batch, docs.seen))).is_err() {
                            return; // the tokenizing side stopped on an error
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            });
            for msg in rx {
                let (batch, seen) = msg?;
                sum.docs_read = docs_before + seen;
                // Parquet row groups can hold 100k documents; the tokenizer gets them in slices.
                for chunk in batch.chunks(batch_docs) {
                    bytes += chunk.iter().map(|d| d.len() as u64).sum::<u64>();
                    let encs = tok
                        .inner
                        .encode_batch_fast(chunk.iter().map(|s| s.as_str()).collect::<Vec<_>>(), false)
                        .map_err(|e| anyhow::anyhow!("tokenizing {} failed: {e}", file.display()))?;
                    let mut ids = Vec::new();
                    for e in &encs {
                        ids.clear();
                        ids.extend_from_slice(e.get_ids());
                        ids.push(eos);
                        tokens += ids.len() as u64;
                        match &mut val_w {
                            Some(w) if val_tokens < self.val_tokens => {
                                w.push(&ids)?;
                                val_tokens += ids.len() as u64;
                            }
                            _ => train_w.push(&ids)?,
                        }
                    }
                    sum.docs_kept += encs.len() as u64;
                    let secs = t0.elapsed().as_secs_f64().max(1e-9);
                    bar.set(
                        seen,
                        format!(
                            "{:.2}M tokens, {:.0}k tokens/s, {:.1} MB/s",
                            tokens as f64 / 1e6,
                            tokens as f64 / secs / 1e3,
                            bytes as f64 / 1e6 / secs
                        ),
                    );
                }
            }
            Ok(())
        })?;
        if let Some(w) = val_w {
            ensure!(val_tokens > 0, "{}: no documents were kept for validation (filters too strict?)", file.display());
            w.finish()?;
        }
        train_w.finish()?;
        bar.finish();
        sum.tokens += tokens;
        sum.val_tokens += val_tokens;
        sum.text_bytes += bytes;
        Ok(())
    }
}

/// A finished shard that opens cleanly with this tokenizer.
fn done(path: &Path, identity: u64) -> bool {
    match Shard::open(path, Some(identity)) {
        Ok(_) => true,
        Err(e) if path.exists() => {
            eprintln!("{e:#}; redoing it");
            false
        }
        Err(_) => false,
    }
}
