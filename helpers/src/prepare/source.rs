//! Documents from parquet and JSONL files: only the text column is decoded (plus the columns a
//! filter needs), a row group at a time, so a 2 GB FineWeb-Edu file never sits in memory whole.
use crate::WithCause;
use anyhow::{bail, ensure, Context, Result};
use parquet::basic::Type as Physical;
use parquet::column::reader::ColumnReader;
use parquet::file::reader::{FileReader, RowGroupReader, SerializedFileReader};
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// Which documents to keep. FineWeb-Edu's columns: `language` (e.g. "en"), `score` (the
/// educational classifier's float score, 0-5; `int_score` is its rounding).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    /// Keep documents whose `language` column equals this.
    pub language: Option<String>,
    /// Keep documents whose `score` column is at least this.
    pub min_score: Option<f64>,
}

/// Input files: each path is a `.parquet`, `.jsonl` or `.json` (JSON lines) file, or a directory
/// searched recursively for them. Sorted within a directory, so the order is stable.
pub fn input_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            collect(p, &mut found)?;
            found.sort();
            ensure!(!found.is_empty(), "{} has no .parquet or .jsonl files; download some first or point at the files", p.display());
            out.extend(found);
        } else if p.is_file() {
            ensure!(kind(p).is_some(), "{} is neither .parquet nor .jsonl/.json (JSON lines)", p.display());
            out.push(p.clone());
        } else {
            bail!("input {} does not exist; download data first (bash setup.sh data download) or fix the path", p.display());
        }
    }
    ensure!(!out.is_empty(), "no input files given");
    Ok(out)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_cause(|| format!("cannot read {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect(&p, out)?;
        } else if kind(&p).is_some() {
            out.push(p);
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Parquet,
    Jsonl,
}

fn kind(p: &Path) -> Option<Kind> {
    match p.extension()?.to_str()? {
        "parquet" => Some(Kind::Parquet),
        "jsonl" | "json" => Some(Kind::Jsonl),
        _ => None,
    }
}

/// Documents of one file, in batches (a parquet row group, or `batch` JSON lines).
pub struct Documents {
    inner: Inner,
    column: String,
    filter: Filter,
    path: PathBuf,
    /// Documents read so far, kept or not.
    pub seen: u64,
}

enum Inner {
    Parquet { reader: SerializedFileReader<std::fs::File>, next: usize, cols: [Option<usize>; 3] },
    Jsonl { lines: std::io::Lines<std::io::BufReader<std::fs::File>>, line: usize, batch: usize },
}

impl Documents {
    /// Opens `path`; `column` is the text column (parquet) or field (JSONL). A missing column
    /// is an error that lists the columns the file has.
    pub fn open(path: &Path, column: &str, filter: &Filter) -> Result<Self> {
        let inner = match kind(path) {
            Some(Kind::Parquet) => {
                let f = std::fs::File::open(path).with_cause(|| format!("cannot open {}", path.display()))?;
                let reader = SerializedFileReader::new(f)
                    .with_cause(|| format!("{} is not a readable parquet file (truncated download? delete it and download again)", path.display()))?;
                let schema = reader.metadata().file_metadata().schema_descr_ptr();
                let find = |name: &str| schema.columns().iter().position(|c| c.path().string() == name);
                let names: Vec<String> = schema.columns().iter().map(|c| c.path().string()).collect();
                let text = find(column).with_context(|| {
                    format!("{} has no column {column:?} (it has: {}); pass the text column's name (--text-column)", path.display(), names.join(", "))
                })?;
                ensure!(schema.column(text).physical_type() == Physical::BYTE_ARRAY, "{}: column {column:?} is not text", path.display());
                let need = |on: bool, name: &str| -> Result<Option<usize>> {
                    if !on {
                        return Ok(None);
                    }
                    find(name).map(Some).with_context(|| {
                        format!("{} has no column {name:?} for the filter (it has: {}); drop the filter", path.display(), names.join(", "))
                    })
                };
                let lang = need(filter.language.is_some(), "language")?;
                let score = need(filter.min_score.is_some(), "score")?;
                Inner::Parquet { reader, next: 0, cols: [Some(text), lang, score] }
            }
            Some(Kind::Jsonl) => {
                let f = std::fs::File::open(path).with_cause(|| format!("cannot open {}", path.display()))?;
                Inner::Jsonl { lines: std::io::BufReader::new(f).lines(), line: 0, batch: 4096 }
            }
            None => bail!("{} is neither .parquet nor .jsonl", path.display()),
        };
        Ok(Self { inner, column: column.to_string(), filter: filter.clone(), path: path.to_path_buf(), seen: 0 })
    }

    /// Number of documents in the file, where the format says it without reading (parquet).
    pub fn rows(&self) -> Option<u64> {
        match &self.inner {
            Inner::Parquet { reader, .. } => Some(reader.metadata().file_metadata().num_rows() as u64),
            Inner::Jsonl { .. } => None,
        }
    }

    /// The next batch of kept documents; `None` at the end of the file.
    pub fn next_batch(&mut self) -> Result<Option<Vec<String>>> {
        match &mut self.inner {
            Inner::Parquet { reader, next, cols } => {
                if *next >= reader.num_row_groups() {
                    return Ok(None);
                }
                let rg = reader.get_row_group(*next).with_cause(|| format!("{}: row group {}", self.path.display(), *next))?;
                *next += 1;
                let rows = rg.metadata().num_rows() as usize;
                let ctx = |c: &str| format!("{}: cannot read column {c:?} (damaged file? delete it and download again)", self.path.display());
                let text = read_strings(rg.as_ref(), cols[0].unwrap(), rows).with_cause(|| ctx(&self.column))?;
                let lang = cols[1].map(|c| read_strings(rg.as_ref(), c, rows)).transpose().with_cause(|| ctx("language"))?;
                let score = cols[2].map(|c| read_numbers(rg.as_ref(), c, rows)).transpose().with_cause(|| ctx("score"))?;
                self.seen += rows as u64;
                let mut out = Vec::with_capacity(rows);
                for (i, t) in text.into_iter().enumerate() {
                    let keep_lang = match (&self.filter.language, &lang) {
                        (Some(want), Some(l)) => l[i].as_deref() == Some(want.as_str()),
                        _ => true,
                    };
                    let keep_score = match (self.filter.min_score, &score) {
                        (Some(min), Some(s)) => s[i].is_some_and(|v| v >= min),
                        _ => true,
                    };
                    if let (Some(t), true, true) = (t, keep_lang, keep_score) {
                        out.push(t);
                    }
                }
                Ok(Some(out))
            }
            Inner::Jsonl { lines, line, batch } => {
                let mut out = Vec::new();
                for l in lines.by_ref() {
                    *line += 1;
                    let l = l.with_cause(|| format!("{}:{}: cannot read (not UTF-8?)", self.path.display(), line))?;
                    if l.trim().is_empty() {
                        continue;
                    }
                    self.seen += 1;
                    let v: serde_json::Value =
                        serde_json::from_str(&l).with_cause(|| format!("{}:{}: not a JSON object", self.path.display(), line))?;
                    let Some(text) = v.get(&self.column).and_then(|t| t.as_str()) else {
                        bail!("{}:{}: no string field {:?}; pass the text field's name (--text-column)", self.path.display(), line, self.column);
                    };
                    let keep_lang =
                        self.filter.language.as_ref().is_none_or(|want| v.get("language").and_then(|x| x.as_str()) == Some(want.as_str()));
                    let keep_score = self.filter.min_score.is_none_or(|min| v.get("score").and_then(|x| x.as_f64()).is_some_and(|s| s >= min));
                    if keep_lang && keep_score {
                        out.push(text.to_string());
                    }
                    if out.len() >= *batch {
                        break;
                    }
                }
                // The loop stops early only on a full batch, so an empty one means the end.
                Ok((!out.is_empty()).then_some(out))
            }
        }
    }
}

/// One flat column of strings, `None` for nulls, one entry per row.
fn read_strings(rg: &dyn RowGroupReader, col: usize, rows: usize) -> Result<Vec<Option<String>>> {
    let max_def = rg.metadata().column(col).column_descr().max_def_level();
    let ColumnReader::ByteArrayColumnReader(mut r) = rg.get_column_reader(col)? else { bail!("not a byte-array column") };
    let (mut values, mut defs) = (Vec::new(), Vec::new());
    let mut read = 0;
    while read < rows {
        let (recs, _, _) = r.read_records(rows - read, Some(&mut defs), None, &mut values)?;
        if recs == 0 {
            break;
        }
        read += recs;
    }
    ensure!(read == rows, "{read} of {rows} rows");
    let mut vals = values.into_iter();
    (0..rows)
        .map(|i| {
            if max_def > 0 && defs[i] != max_def {
                return Ok(None);
            }
            let b = vals.next().ok_or_else(|| anyhow::anyhow!("fewer values than rows"))?;
            Ok(Some(String::from_utf8_lossy(b.data()).into_owned()))
        })
        .collect()
}

/// One flat numeric column (float, double or integer) as f64, `None` for nulls.
fn read_numbers(rg: &dyn RowGroupReader, col: usize, rows: usize) -> Result<Vec<Option<f64>>> {
    let max_def = rg.metadata().column(col).column_descr().max_def_level();
    let mut defs = Vec::new();
    macro_rules! read_all {
        ($r:expr) => {{
            let mut values = Vec::new();
            let mut read = 0;
            while read < rows {
                let (recs, _, _) = $r.read_records(rows - read, Some(&mut defs), None, &mut values)?;
                if recs == 0 {
                    break;
                }
                read += recs;
            }
            ensure!(read == rows, "{read} of {rows} rows");
            values.into_iter().map(|v| v as f64).collect::<Vec<f64>>()
        }};
    }
    let values = match rg.get_column_reader(col)? {
        ColumnReader::DoubleColumnReader(mut r) => read_all!(r),
        ColumnReader::FloatColumnReader(mut r) => read_all!(r),
        ColumnReader::Int64ColumnReader(mut r) => read_all!(r),
        ColumnReader::Int32ColumnReader(mut r) => read_all!(r),
        _ => bail!("not a numeric column"),
    };
    let mut vals = values.into_iter();
    Ok((0..rows).map(|i| if max_def == 0 || defs[i] == max_def { vals.next() } else { None }).collect())
}
