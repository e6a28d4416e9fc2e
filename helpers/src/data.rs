//! The bundled-data pipeline: tokenize a JSONL corpus once (cached), split it into train and
//! validation by documents, and cut batches of token windows.
//!
//! A corpus file has one JSON object per line with a `text` field (other fields are ignored).
//! Each document is encoded without special tokens and followed by EOS, as OLMoE was trained.
//! The first documents, up to `val_fraction` of the tokens, are the validation split, so the two
//! splits never share a document.
//!
//! The token cache (`<cache_dir>/<corpus stem>-<key>.tokens`) is keyed by a hash of the corpus
//! bytes, the tokenizer bytes and the split; it is written to a temporary file and renamed, so an
//! interrupted run never leaves a half-written cache behind, and a damaged one is rebuilt.
use crate::WithCause;
use anyhow::{bail, ensure, Context, Result};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// The bundled corpus, relative to the project root (see `data/default/README.md`).
pub const DEFAULT_CORPUS: &str = "data/default/shakespeare.jsonl";
/// The OLMoE tokenizer (`gpt-neox-olmo-dolma-v1_5`), relative to the project root.
pub const DEFAULT_TOKENIZER: &str = "data/default/tokenizer.json";
/// Where token caches go, relative to the project root (git-ignored).
pub const DEFAULT_CACHE_DIR: &str = "data/cache";

const MAGIC: &[u8; 8] = b"MOETOKS\0";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 8 + 8;

/// A tokenizer plus the ids the training code needs.
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    /// End-of-document id (50279 for the OLMoE tokenizer).
    pub eos_id: i64,
    /// Number of ids the tokenizer can produce (50280 for OLMoE; the model's vocab may be larger).
    pub vocab_size: usize,
    /// Where it was loaded from.
    pub path: PathBuf,
}

impl Tokenizer {
    /// Loads a `tokenizer.json`; EOS is the `<|endoftext|>` token.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        ensure!(path.is_file(), "tokenizer file {} does not exist; the bundled one is {DEFAULT_TOKENIZER}", path.display());
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("cannot read tokenizer {}: {e}", path.display()))?;
        let eos_id = inner
            .token_to_id("<|endoftext|>")
            .with_context(|| format!("tokenizer {} has no <|endoftext|> token", path.display()))? as i64;
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self { inner, eos_id, vocab_size, path: path.to_path_buf() })
    }

    /// Token ids of `text`, without special tokens (OLMoE uses no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Text of `ids`; special tokens are kept so EOS shows up as `<|endoftext|>`.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, false).map_err(|e| anyhow::anyhow!("decoding failed: {e}"))
    }
}

/// A tokenized corpus split into train and validation token streams.
pub struct Corpus {
    /// Training tokens, documents back to back, each followed by EOS.
    pub train: Vec<u32>,
    /// Validation tokens (the first documents of the file).
    pub val: Vec<u32>,
    /// The cache file these came from.
    pub cache_path: PathBuf,
}

impl Corpus {
    /// Tokenizes `corpus` (JSONL with a `text` field) with `tok`, or reads the cached result.
    pub fn load(corpus: impl AsRef<Path>, tok: &Tokenizer, cache_dir: impl AsRef<Path>, val_fraction: f64) -> Result<Self> {
        let corpus = corpus.as_ref();
        ensure!(
            (0.0..1.0).contains(&val_fraction) && val_fraction > 0.0,
            "val_fraction must be in (0, 1), got {val_fraction}"
        );
        let bytes = std::fs::read(corpus)
            .with_cause(|| format!("cannot read corpus {}; the bundled one is {DEFAULT_CORPUS}", corpus.display()))?;
        let tok_bytes = std::fs::read(&tok.path).with_cause(|| format!("cannot read {}", tok.path.display()))?;
        let mut key = Fnv::new();
        key.write(&VERSION.to_le_bytes());
        key.write(&bytes);
        key.write(&tok_bytes);
        key.write(&val_fraction.to_le_bytes());
        let key = key.0;
        let stem = corpus.file_stem().and_then(|s| s.to_str()).unwrap_or("corpus");
        let cache_path = cache_dir.as_ref().join(format!("{stem}-{key:016x}.tokens"));
        match read_cache(&cache_path, key) {
            Ok(Some((train, val))) => return Ok(Self { train, val, cache_path }),
            Ok(None) => {}
            Err(e) => eprintln!("token cache {} is damaged ({e:#}); rebuilding it", cache_path.display()),
        }
        let docs = parse_jsonl(&bytes, corpus)?;
        ensure!(docs.len() >= 2, "{} has {} document(s); a train/validation split needs at least 2", corpus.display(), docs.len());
        let t0 = std::time::Instant::now();
        let encs = tok
            .inner
            .encode_batch(docs.iter().map(|s| s.as_str()).collect::<Vec<_>>(), false)
            .map_err(|e| anyhow::anyhow!("tokenizing {} failed: {e}", corpus.display()))?;
        let total: usize = encs.iter().map(|e| e.len() + 1).sum();
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (i, e) in encs.iter().enumerate() {
            // The first documents go to validation until it holds val_fraction of the tokens, but
            // at least one document stays in train.
            let to_val = i + 1 < encs.len() && (val.len() as f64) < val_fraction * total as f64;
            let dst = if to_val { &mut val } else { &mut train };
            dst.extend_from_slice(e.get_ids());
            dst.push(tok.eos_id as u32);
        }
        println!(
            "tokenized {} documents of {} into {} tokens ({} train, {} validation) in {:.1}s; cached at {}",
            docs.len(),
            corpus.display(),
            total,
            train.len(),
            val.len(),
            t0.elapsed().as_secs_f64(),
            cache_path.display()
        );
        write_cache(&cache_path, key, &train, &val)?;
        Ok(Self { train, val, cache_path })
    }

    /// A training batch: `b` windows of `t + 1` tokens at positions drawn from (seed, index) only,
    /// so the same (seed, index) gives the same batch on any machine and after a resume.
    /// Returns (inputs, targets), both `(b, t)` int64 on `device`.
    pub fn train_batch(&self, seed: u64, index: u64, b: usize, t: usize, device: Device) -> Result<(Tensor, Tensor)> {
        ensure!(self.train.len() > t + 1, "training split has {} tokens, fewer than one window of {}", self.train.len(), t + 1);
        let span = (self.train.len() - t - 1) as u64;
        let starts: Vec<usize> = (0..b as u64)
            .map(|j| (splitmix64(seed ^ splitmix64(index.wrapping_mul(0x9E37_79B9) ^ j)) % span) as usize)
            .collect();
        Ok(windows(&self.train, &starts, t, device))
    }

    /// Validation batches: consecutive non-overlapping windows from the start of the validation
    /// split, at most `max_batches` of them (fewer if the split is short). Deterministic.
    pub fn val_batches(&self, b: usize, t: usize, max_batches: usize, device: Device) -> Result<Vec<(Tensor, Tensor)>> {
        let n_windows = (self.val.len().saturating_sub(1)) / t;
        ensure!(n_windows >= b, "validation split has {} tokens, fewer than one batch of {b} x {t}", self.val.len());
        let n_batches = (n_windows / b).min(max_batches);
        Ok((0..n_batches)
            .map(|i| {
                let starts: Vec<usize> = (0..b).map(|j| (i * b + j) * t).collect();
                windows(&self.val, &starts, t, device)
            })
            .collect())
    }
}

/// Stacks windows `tokens[s .. s + t + 1]` into (inputs, targets) of shape (B, T).
fn windows(tokens: &[u32], starts: &[usize], t: usize, device: Device) -> (Tensor, Tensor) {
    let mut buf = Vec::with_capacity(starts.len() * (t + 1));
    for &s in starts {
        buf.extend(tokens[s..s + t + 1].iter().map(|&x| x as i64));
    }
    let w = Tensor::from_slice(&buf).view([starts.len() as i64, t as i64 + 1]); // (B, T+1)
    let x = w.narrow(1, 0, t as i64).contiguous().to_device(device); // (B, T)
    let y = w.narrow(1, 1, t as i64).contiguous().to_device(device); // (B, T)
    (x, y)
}

fn parse_jsonl(bytes: &[u8], path: &Path) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for (i, line) in bytes.lines().enumerate() {
        let line = line.with_cause(|| format!("{}:{}: not valid UTF-8", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).with_cause(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
        match v.get("text").and_then(|t| t.as_str()) {
            Some(t) => docs.push(t.to_string()),
            None => bail!("{}:{}: no string field \"text\"", path.display(), i + 1),
        }
    }
    Ok(docs)
}

fn read_cache(path: &Path, key: u64) -> Result<Option<(Vec<u32>, Vec<u32>)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    ensure!(bytes.len() >= HEADER_BYTES && &bytes[..8] == MAGIC, "bad magic");
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    ensure!(u32_at(8) == VERSION, "version {} (expected {VERSION})", u32_at(8));
    let width = u32_at(12) as usize;
    ensure!(width == 2 || width == 4, "token width {width}");
    let (n_train, n_val, k) = (u64_at(16) as usize, u64_at(24) as usize, u64_at(32));
    ensure!(k == key, "key mismatch");
    ensure!(bytes.len() == HEADER_BYTES + (n_train + n_val) * width, "size {} does not match its header", bytes.len());
    let body = &bytes[HEADER_BYTES..];
    let tokens: Vec<u32> = if width == 2 {
        body.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect()
    } else {
        body.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let val = tokens[n_train..].to_vec();
    let mut train = tokens;
    train.truncate(n_train);
    Ok(Some((train, val)))
}

fn write_cache(path: &Path, key: u64, train: &[u32], val: &[u32]) -> Result<()> {
    let dir = path.parent().context("cache path has no directory")?;
    std::fs::create_dir_all(dir).with_cause(|| format!("cannot create cache directory {}", dir.display()))?;
    // u16 ids when the vocabulary fits (it does for OLMoE's 50280), u32 otherwise.
    let width: u32 = if train.iter().chain(val).all(|&x| x <= u16::MAX as u32) { 2 } else { 4 };
    let mut buf = Vec::with_capacity(HEADER_BYTES + (train.len() + val.len()) * width as usize);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&width.to_le_bytes());
    buf.extend_from_slice(&(train.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(val.len() as u64).to_le_bytes());
    buf.extend_from_slice(&key.to_le_bytes());
    for &x in train.iter().chain(val) {
        if width == 2 {
            buf.extend_from_slice(&(x as u16).to_le_bytes());
        } else {
            buf.extend_from_slice(&x.to_le_bytes());
        }
    }
    crate::run::write_atomic(path, &buf)
}

/// 64-bit FNV-1a, for cache keys (stable across Rust versions, unlike `DefaultHasher`).
struct Fnv(u64);
impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// SplitMix64: a tiny, well-mixed, seedable hash used to place batch windows.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
