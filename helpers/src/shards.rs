//! Binary token shards for pretraining-scale data, memory-mapped, and a loader whose batch order
//! depends only on (seed, position), so a checkpointed position resumes exactly.
//!
//! Shard file (little endian):
//! ```text
//! 0   magic     b"MOESHRD1"
//! 8   version   u32 = 1
//! 12  dtype     u32: 2 = u16 token ids, 4 = u32
//! 16  n_tokens  u64
//! 24  n_docs    u64
//! 32  tokenizer u64  (FNV-1a of the tokenizer.json bytes: shards and tokenizer must match)
//! 40  reserved  24 bytes of zeros
//! 64  tokens    n_tokens x dtype (each document followed by EOS)
//! ..  doc_ends  n_docs x u64 (end offset of each document, in tokens)
//! ```
//! A shard is written as `<name>.tmp` and renamed when complete, so a crash leaves either a whole
//! shard or a `.tmp` file that the next run redoes; the size in the header catches truncation.
use crate::WithCause;
use anyhow::{bail, ensure, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const MAGIC: &[u8; 8] = b"MOESHRD1";
pub const VERSION: u32 = 1;
const HEADER: usize = 64;

/// FNV-1a 64 of some bytes (the tokenizer identity stored in shard headers).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Writes one shard: push documents, then `finish` renames it into place.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    dtype: u32,
    n_tokens: u64,
    doc_ends: Vec<u64>,
    tokenizer: u64,
}

impl ShardWriter {
    /// `vocab_size` picks u16 ids when they fit, u32 otherwise.
    pub fn create(path: &Path, vocab_size: usize, tokenizer: u64) -> Result<Self> {
        let tmp = path.with_extension("tmp");
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).with_cause(|| format!("cannot create {}", d.display()))?;
        }
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).with_cause(|| format!("cannot create {}", tmp.display()))?);
        file.write_all(&[0u8; HEADER])?; // the real header is written by finish
        let dtype = if vocab_size <= 1 << 16 { 2 } else { 4 };
        Ok(Self { path: path.to_path_buf(), tmp, file, dtype, n_tokens: 0, doc_ends: Vec::new(), tokenizer })
    }

    /// Appends one document's token ids (EOS included by the caller).
    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        let mut bytes = Vec::with_capacity(ids.len() * self.dtype as usize);
        for &id in ids {
            if self.dtype == 2 {
                ensure!(id < 1 << 16, "token id {id} does not fit the shard's u16 ids");
                bytes.extend_from_slice(&(id as u16).to_le_bytes());
            } else {
                bytes.extend_from_slice(&id.to_le_bytes());
            }
        }
        self.file.write_all(&bytes)?;
        self.n_tokens += ids.len() as u64;
        self.doc_ends.push(self.n_tokens);
        Ok(())
    }

    pub fn finish(mut self) -> Result<PathBuf> {
        use std::io::{Seek, SeekFrom};
        for e in &self.doc_ends {
            self.file.write_all(&e.to_le_bytes())?;
        }
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&self.dtype.to_le_bytes());
        header.extend_from_slice(&self.n_tokens.to_le_bytes());
        header.extend_from_slice(&(self.doc_ends.len() as u64).to_le_bytes());
        header.extend_from_slice(&self.tokenizer.to_le_bytes());
        header.resize(HEADER, 0);
        let mut f = self.file.into_inner().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", self.tmp.display()))?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&header)?;
        f.sync_all()?;
        std::fs::rename(&self.tmp, &self.path).with_cause(|| format!("cannot rename {} into place", self.tmp.display()))?;
        Ok(self.path)
    }
}

/// One memory-mapped shard.
pub struct Shard {
    pub path: PathBuf,
    map: memmap2::Mmap,
    pub dtype: u32,
    pub n_tokens: u64,
    pub n_docs: u64,
    pub tokenizer: u64,
}

impl Shard {
    /// Maps `path` and checks its header and size; `tokenizer` (if given) must match the shard's.
    pub fn open(path: &Path, tokenizer: Option<u64>) -> Result<Self> {
        let f = std::fs::File::open(path).with_cause(|| format!("cannot open shard {}", path.display()))?;
        // Safety: shards are immutable once renamed into place; nothing writes them while mapped.
        let map = unsafe { memmap2::Mmap::map(&f) }.with_cause(|| format!("cannot map shard {}", path.display()))?;
        let redo = "delete it and run the processing step again";
        ensure!(map.len() >= HEADER && &map[..8] == MAGIC, "{} is not a token shard (bad magic); {redo}", path.display());
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap());
        let (version, dtype, n_tokens, n_docs, tok) = (u32_at(8), u32_at(12), u64_at(16), u64_at(24), u64_at(32));
        ensure!(version == VERSION, "{} has shard format version {version}, this code reads {VERSION}; {redo}", path.display());
        ensure!(dtype == 2 || dtype == 4, "{} has an unknown token dtype {dtype}; {redo}", path.display());
        let expect = HEADER as u64 + n_tokens * dtype as u64 + n_docs * 8;
        ensure!(map.len() as u64 == expect, "{} is {} bytes but its header says {expect} (truncated or damaged); {redo}", path.display(), map.len());
        if let Some(t) = tokenizer {
            ensure!(t == tok, "{} was tokenized with another tokenizer (identity {tok:016x}, expected {t:016x}); process the data again with this tokenizer or train with the one the shards were made with", path.display());
        }
        Ok(Self { path: path.to_path_buf(), map, dtype, n_tokens, n_docs, tokenizer: tok })
    }

    /// Tokens [start, start + n) as i64.
    pub fn tokens(&self, start: u64, n: usize) -> Vec<i64> {
        let (s, d) = (start as usize, self.dtype as usize);
        let bytes = &self.map[HEADER + s * d..HEADER + (s + n) * d];
        if d == 2 {
            bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as i64).collect()
        } else {
            bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64).collect()
        }
    }

    /// End offsets of the documents.
    pub fn doc_ends(&self) -> Vec<u64> {
        let base = HEADER + self.n_tokens as usize * self.dtype as usize;
        self.map[base..].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
    }
}

/// The shards of a directory (`*.bin`, sorted by name).
pub fn open_dir(dir: &Path, tokenizer: Option<u64>) -> Result<Vec<Shard>> {
    let entries = std::fs::read_dir(dir).with_cause(|| format!("cannot read shard directory {}; run the processing step first", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "bin")).collect();
    paths.sort();
    if paths.is_empty() {
        bail!("{} has no token shards (*.bin); run the processing step first", dir.display());
    }
    paths.iter().map(|p| Shard::open(p, tokenizer)).collect()
}

/// A bijection of [0, n) keyed by `seed`: a 4-round Feistel network on the next power of two,
/// cycle-walking until the value falls in range. O(1) memory for billions of windows.
pub fn permute(i: u64, n: u64, seed: u64) -> u64 {
    assert!(i < n);
    let bits = 64 - (n.max(2) - 1).leading_zeros();
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    let mut x = i;
    loop {
        let (mut l, mut r) = (x >> half, x & mask);
        for round in 0..4u64 {
            let f = crate::checkpoint::step_seed(seed ^ round.wrapping_mul(0x9E37_79B9), r as i64) as u64 & mask;
            (l, r) = (r, l ^ f);
        }
        x = (l << half) | r;
        if x < n {
            return x;
        }
    }
}

/// Training windows of S+1 tokens over all shards (stride S, so every token is a target once per
/// epoch), visited in a seeded order that depends only on (seed, position).
pub struct Loader {
    pub shards: Vec<Shard>,
    /// Cumulative window counts: shard k holds windows [starts[k], starts[k+1]).
    starts: Vec<u64>,
    pub seq_len: u64,
    pub seed: u64,
}

impl Loader {
    pub fn new(shards: Vec<Shard>, seq_len: usize, seed: u64) -> Result<Self> {
        let s = seq_len as u64;
        let mut starts = vec![0u64];
        for sh in &shards {
            starts.push(starts.last().unwrap() + sh.n_tokens.saturating_sub(1) / s);
        }
        ensure!(*starts.last().unwrap() > 0, "the shards hold fewer than {} tokens: not one training sequence", s + 1);
        Ok(Self { shards, starts, seq_len: s, seed })
    }

    /// Windows per epoch.
    pub fn windows(&self) -> u64 {
        *self.starts.last().unwrap()
    }

    /// Tokens of window `w` (S+1 of them).
    fn window(&self, w: u64) -> Vec<i64> {
        let k = self.starts.partition_point(|&x| x <= w) - 1;
        self.shards[k].tokens((w - self.starts[k]) * self.seq_len, self.seq_len as usize + 1)
    }

    /// Micro-batch `position` for `rank` of `world`: (inputs, targets), each (B, S) int64 on the
    /// CPU. Ranks take disjoint windows; the order repeats only after an epoch, reshuffled.
    pub fn batch(&self, position: u64, batch: usize, rank: usize, world: usize) -> (Tensor, Tensor) {
        let n = self.windows();
        let s = self.seq_len as i64;
        let mut flat = Vec::with_capacity(batch * (s as usize + 1));
        for j in 0..batch as u64 {
            let g = (position * world as u64 + rank as u64) * batch as u64 + j; // global sample index
            let (epoch, i) = (g / n, g % n);
            flat.extend(self.window(permute(i, n, self.seed.wrapping_add(epoch))));
        }
        let t = Tensor::from_slice(&flat).view([batch as i64, s + 1]);
        (t.narrow(1, 0, s), t.narrow(1, 1, s))
    }
}

/// Evaluation batches: the first `max_batches` x `batch` windows of `shards` in order (not
/// permuted), as (inputs, targets) of shape (B, S) on `device`. Fewer if the shards are short;
/// an error if they hold less than one batch.
pub fn eval_batches(shards: Vec<Shard>, batch: usize, seq_len: usize, max_batches: usize, device: Device) -> Result<Vec<(Tensor, Tensor)>> {
    let loader = Loader::new(shards, seq_len, 0)?;
    let n = (loader.windows() as usize / batch.max(1)).min(max_batches);
    ensure!(n > 0, "the validation shards hold {} windows of {} tokens, fewer than one batch of {batch}", loader.windows(), seq_len + 1);
    Ok((0..n)
        .map(|i| {
            let flat: Vec<i64> = (0..batch).flat_map(|j| loader.window((i * batch + j) as u64)).collect();
            let t = Tensor::from_slice(&flat).view([batch as i64, seq_len as i64 + 1]).to_device(device);
            (t.narrow(1, 0, seq_len as i64), t.narrow(1, 1, seq_len as i64))
        })
        .collect())
}

/// Batches prepared by a background thread, so loading never stalls a GPU step.
pub struct Prefetcher {
    rx: std::sync::mpsc::Receiver<(u64, Tensor, Tensor)>,
    device: Device,
}

impl Prefetcher {
    /// Starts producing batches `start..` (`depth` ahead) of `loader` for `rank` of `world`.
    pub fn new(loader: std::sync::Arc<Loader>, start: u64, batch: usize, rank: usize, world: usize, depth: usize, device: Device) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(depth.max(1));
        std::thread::spawn(move || {
            for pos in start.. {
                let (x, y) = loader.batch(pos, batch, rank, world);
                let (x, y) = if device.is_cuda() { (x.pin_memory(device), y.pin_memory(device)) } else { (x, y) };
                if tx.send((pos, x, y)).is_err() {
                    return; // the Prefetcher was dropped
                }
            }
        });
        Self { rx, device }
    }

    /// The next batch (position, inputs, targets) on the device.
    pub fn next(&self) -> Result<(u64, Tensor, Tensor)> {
        let (p, x, y) = self.rx.recv().map_err(|_| anyhow::anyhow!("the data loader thread stopped"))?;
        Ok((p, x.to_device_(self.device, Kind::Int64, true, false), y.to_device_(self.device, Kind::Int64, true, false)))
    }
}
