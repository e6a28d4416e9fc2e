//! The tokenizer and the bundled data's paths. Text becomes training data through token shards:
//! [`crate::prepare`] writes them (the notebook processes the bundled corpus the first time it
//! runs), [`crate::shards`] reads them.
use crate::WithCause;
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};

/// The bundled corpus, relative to the project root (see `data/default/README.md`).
pub const DEFAULT_CORPUS: &str = "data/default/shakespeare.jsonl";
/// The OLMoE tokenizer (`gpt-neox-olmo-dolma-v1_5`), relative to the project root.
pub const DEFAULT_TOKENIZER: &str = "data/default/tokenizer.json";
/// Where processed shards of single files go, relative to the project root (git-ignored).
pub const DEFAULT_CACHE_DIR: &str = "data/cache";

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

    /// The identity stored in token shards: FNV-1a of the tokenizer.json bytes.
    pub fn identity(&self) -> Result<u64> {
        let bytes = std::fs::read(&self.path).with_cause(|| format!("cannot read {}", self.path.display()))?;
        Ok(crate::shards::fnv1a(&bytes))
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
