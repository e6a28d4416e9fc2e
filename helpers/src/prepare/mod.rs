//! Pretraining data, from nothing to token shards: download a hub dataset's parquet files
//! ([`download`]), then tokenize any parquet / JSONL files into the shard format of
//! [`crate::shards`] ([`Process`]). The notebooks `data/download.ipynb` and `data/process.ipynb`
//! and the command `bash setup.sh data ...` (the `data` binary) are thin wrappers around these.
mod process;
mod source;

pub use process::{Process, Settings, Summary};
pub use source::{input_files, Documents, Filter};

use crate::hf::Hub;
use anyhow::{ensure, Result};
use std::path::{Path, PathBuf};

/// FineWeb-Edu, interpretable-moes' pretraining corpus.
pub const FINEWEB_EDU: &str = "HuggingFaceFW/fineweb-edu";
/// Its 10B-token sample: 14 parquet files, ~28.5 GB, 9.67M documents.
pub const FINEWEB_EDU_10BT: &str = "sample/10BT/*.parquet";

/// Downloads the files of hub dataset `repo` (`owner/name[@revision]`) whose paths match `pattern`
/// (`*` matches within a path segment, `**` across segments, `?` one character), at most
/// `max_files` of them in name order, into the hub cache (`$HF_HOME/hub`). Returns their local
/// paths in that order.
///
/// Interrupted downloads resume where they stopped (hf-hub keeps a `.part` file); files already in
/// the cache are not fetched again. `HF_TOKEN`, `HF_HOME` and `HF_ENDPOINT` are honoured;
/// with `HF_HUB_OFFLINE=1` only the cache is used and nothing touches the network.
pub fn download(repo: &str, pattern: &str, max_files: Option<usize>) -> Result<Vec<PathBuf>> {
    download_with_retries(repo, pattern, max_files, 5)
}

/// [`download`] with the number of times a broken transfer is resumed before giving up.
pub fn download_with_retries(repo: &str, pattern: &str, max_files: Option<usize>, retries: usize) -> Result<Vec<PathBuf>> {
    let (id, revision) = split_id(repo)?;
    fetch(repo, pattern, max_files, Hub::with_retries(id, hf_hub::RepoType::Dataset, revision, retries)?)
}

/// The local paths of the files [`download`] fetched, from the hub cache only (no network).
pub fn cached(repo: &str, pattern: &str, max_files: Option<usize>) -> Result<Vec<PathBuf>> {
    let (id, revision) = split_id(repo)?;
    fetch(repo, pattern, max_files, Hub::new(id, hf_hub::RepoType::Dataset, revision)?.cache_only())
}

fn split_id(repo: &str) -> Result<(&str, &str)> {
    let (id, revision) = repo.split_once('@').unwrap_or((repo, "main"));
    ensure!(id.split('/').count() == 2 && !id.contains(' '), "{repo:?} is not a hub dataset id like {FINEWEB_EDU}[@revision]");
    Ok((id, revision))
}

fn fetch(repo: &str, pattern: &str, max_files: Option<usize>, hub: Hub) -> Result<Vec<PathBuf>> {
    let mut files: Vec<String> = hub.list()?.into_iter().filter(|f| glob(pattern, f)).collect();
    files.sort();
    if let Some(n) = max_files {
        files.truncate(n);
    }
    let where_ = if hub.offline { "in the local hub cache (HF_HUB_OFFLINE=1, or nothing downloaded yet: download first)" } else { "on the hub" };
    ensure!(!files.is_empty(), "no file of dataset {repo} matches {pattern:?} {where_}");
    let mut out = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        if !hub.offline {
            eprintln!("[{}/{}] {repo}: {f}", i + 1, files.len());
        }
        let p = hub.get(f)?.ok_or_else(|| anyhow::anyhow!("{repo}: {f} not found {where_}"))?;
        out.push(p);
    }
    Ok(out)
}

/// A `tokenizer.json` for `spec`: an existing file; `olmoe` (or empty) for the bundled OLMoE
/// tokenizer; otherwise a hub model id (`owner/name[@revision]`) whose `tokenizer.json` is
/// downloaded through the hub cache.
pub fn tokenizer_file(spec: &str) -> Result<PathBuf> {
    if spec.is_empty() || spec == "olmoe" {
        return Ok(crate::project_root()?.join(crate::data::DEFAULT_TOKENIZER));
    }
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    let (id, revision) = spec.split_once('@').unwrap_or((spec, "main"));
    ensure!(id.split('/').count() == 2, "tokenizer {spec:?} is neither a file, nor `olmoe`, nor a hub id like allenai/OLMoE-1B-7B-0924");
    let hub = Hub::new(id, hf_hub::RepoType::Model, revision)?;
    hub.get("tokenizer.json")?.ok_or_else(|| anyhow::anyhow!("{spec} has no tokenizer.json on the hub"))
}

/// The shard directory for a notebook's `data` setting. A directory made by [`Process`] (it has
/// `manifest.json`) is used as it is. A single parquet / JSONL file (the bundled corpus, say) is
/// processed into `<cache_dir>/shards/<stem>-<key>/` the first time, keyed by a hash of the file,
/// the tokenizer and `val_tokens`, and found there afterwards. Returns the directory.
pub fn shards_for(data: &Path, tokenizer: &Path, val_tokens: u64, cache_dir: &Path) -> Result<PathBuf> {
    if data.is_dir() {
        ensure!(
            data.join("manifest.json").is_file(),
            "{} is not a shard directory (no manifest.json); make one with `bash setup.sh data process --input {} --out <dir>` (or data/process.ipynb) and train on <dir>",
            data.display(),
            data.display()
        );
        return Ok(data.to_path_buf());
    }
    let bytes = std::fs::read(data).map_err(|e| {
        anyhow::anyhow!(
            "cannot read training data {}: {e}; give a shard directory or a parquet / JSONL file (the bundled one is {})",
            data.display(),
            crate::data::DEFAULT_CORPUS
        )
    })?;
    let tok = std::fs::read(tokenizer).map_err(|e| anyhow::anyhow!("cannot read tokenizer {}: {e}", tokenizer.display()))?;
    let key = crate::shards::fnv1a(&bytes) ^ crate::shards::fnv1a(&tok).rotate_left(17) ^ val_tokens.rotate_left(43);
    let stem = data.file_stem().unwrap_or_default().to_string_lossy();
    let out = cache_dir.join("shards").join(format!("{stem}-{key:016x}"));
    let mut job = Process::new(vec![data.to_path_buf()], &out, tokenizer);
    job.val_tokens = val_tokens;
    let sum = job.run()?;
    if sum.skipped_files < sum.files {
        println!("{sum}");
    }
    Ok(out)
}

/// Shell-style match of a repository path: `*` and `?` stay within one `/` segment, `**` spans
/// segments.
pub fn glob(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p {
            [] => s.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| go(rest, &s[i..])),
            [b'*', rest @ ..] => (0..=s.len()).take_while(|&i| i == 0 || s[i - 1] != b'/').any(|i| go(rest, &s[i..])),
            [b'?', rest @ ..] => !s.is_empty() && s[0] != b'/' && go(rest, &s[1..]),
            [c, rest @ ..] => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), path.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn glob_matches_like_a_shell() {
        assert!(glob("sample/10BT/*.parquet", "sample/10BT/000_00000.parquet"));
        assert!(!glob("sample/10BT/*.parquet", "sample/100BT/000_00000.parquet"));
        assert!(!glob("*.parquet", "sample/10BT/000_00000.parquet"));
        assert!(glob("**.parquet", "sample/10BT/000_00000.parquet"));
        assert!(glob("data/00?.jsonl", "data/001.jsonl"));
        assert!(!glob("data/00?.jsonl", "data/0012.jsonl"));
        assert!(glob("exact.txt", "exact.txt"));
    }
}
