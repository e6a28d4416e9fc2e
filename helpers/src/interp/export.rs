//! Routing in long format (parquet and CSV) and expert usage saved during training.
//!
//! Long format: one row per (sequence, token, MoE layer, top-K slot) with the columns
//! `sequence_ix, token_ix, token_id, layer_ix, topk_ix, expert, weight` (int64, weight float32),
//! ordered by sequence, token, layer, slot: what interpretable-moes' analysis code reads
//! (`pandas.read_parquet`, `polars.read_csv`). Files are written under a temporary name and renamed,
//! so an interrupted export never leaves a truncated file.
use super::Routing;
use crate::WithCause;
use anyhow::Result;
use parquet::data_type::{FloatType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use serde::{Deserialize, Serialize};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const COLUMNS: [&str; 7] = ["sequence_ix", "token_ix", "token_id", "layer_ix", "topk_ix", "expert", "weight"];

/// Tokens per parquet row group (times layers and K rows).
const TOKENS_PER_GROUP: usize = 1 << 16;

impl Routing {
    /// Calls `f(sequence_ix, token_ix, token_id, layer_ix, topk_ix, expert, weight)` for every row
    /// of tokens `range`, in file order.
    fn rows(&self, range: std::ops::Range<usize>, mut f: impl FnMut([i64; 6], f32)) {
        let t_len = self.seq_len.max(1);
        for n in range {
            for (l, &layer_ix) in self.layers.iter().enumerate() {
                for k in 0..self.top_k {
                    let i = n * self.top_k + k;
                    f([(n / t_len) as i64, (n % t_len) as i64, self.token_ids[n], layer_ix, k as i64, self.experts[l][i]], self.weights[l][i]);
                }
            }
        }
    }

    /// Writes the long-format CSV (with a header row) to `path`.
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        write_via_tmp(path, |file| {
            let mut w = BufWriter::new(file);
            writeln!(w, "{}", COLUMNS.join(","))?;
            let mut res = Ok(());
            self.rows(0..self.n_tokens(), |v, weight| {
                if res.is_ok() {
                    res = writeln!(w, "{},{},{},{},{},{},{weight}", v[0], v[1], v[2], v[3], v[4], v[5]);
                }
            });
            res?;
            w.flush()?;
            Ok(())
        })
    }

    /// Writes the long format as parquet (zstd) to `path`.
    pub fn write_parquet(&self, path: &Path) -> Result<()> {
        write_via_tmp(path, |file| {
            let schema = Arc::new(parquet::schema::parser::parse_message_type(
                "message routing { REQUIRED INT64 sequence_ix; REQUIRED INT64 token_ix; REQUIRED INT64 token_id; \
                 REQUIRED INT64 layer_ix; REQUIRED INT64 topk_ix; REQUIRED INT64 expert; REQUIRED FLOAT weight; }",
            )?);
            let props = Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::ZSTD(Default::default())).build());
            let mut w = SerializedFileWriter::new(file, schema, props)?;
            let n = self.n_tokens();
            for start in (0..n).step_by(TOKENS_PER_GROUP) {
                let mut ints: [Vec<i64>; 6] = Default::default();
                let mut weights = Vec::new();
                self.rows(start..(start + TOKENS_PER_GROUP).min(n), |v, weight| {
                    for (col, x) in ints.iter_mut().zip(v) {
                        col.push(x);
                    }
                    weights.push(weight);
                });
                let mut rg = w.next_row_group()?;
                for col in &ints {
                    let mut c = rg.next_column()?.expect("schema has 7 columns");
                    c.typed::<Int64Type>().write_batch(col, None, None)?;
                    c.close()?;
                }
                let mut c = rg.next_column()?.expect("schema has 7 columns");
                c.typed::<FloatType>().write_batch(&weights, None, None)?;
                c.close()?;
                rg.close()?;
            }
            w.close()?;
            Ok(())
        })
    }

    /// Writes `<dir>/routing.parquet` and `<dir>/routing.csv`; returns their paths.
    pub fn export(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir).with_cause(|| format!("cannot create {}", dir.display()))?;
        let (pq, csv) = (dir.join("routing.parquet"), dir.join("routing.csv"));
        self.write_parquet(&pq)?;
        self.write_csv(&csv)?;
        Ok((pq, csv))
    }
}

fn write_via_tmp(path: &Path, write: impl FnOnce(std::fs::File) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let file = std::fs::File::create(&tmp).with_cause(|| format!("cannot create {}", tmp.display()))?;
    let res = write(file).and_then(|_| std::fs::rename(&tmp, path).map_err(Into::into));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_cause(|| format!("cannot write {}", path.display()))
}

/// One line of `expert_usage.jsonl`: (token, slot) assignments per expert of each MoE layer,
/// counted over the training steps since the previous line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub step: i64,
    /// Tokens trained when the line was written.
    pub tokens: i64,
    /// Decoder-layer index of each MoE layer.
    pub layers: Vec<i64>,
    /// (L_moe, E) counts.
    pub counts: Vec<Vec<f64>>,
}

/// The rows of an `expert_usage.jsonl` (empty when the file does not exist); a torn last line is
/// skipped.
pub fn read_usage(path: &Path) -> Result<Vec<UsageRow>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}
