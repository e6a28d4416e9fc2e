//! Routing analysis: which experts each token visits, exported and summarised.
//!
//! A [`Routing`] table holds, for every token of a set of sequences and every MoE layer, the
//! top-K experts the router chose and their gate weights, copied to the host once (collect it
//! from a model's forward with [`Routing::push`], at a cadence during training or on any
//! checkpoint, an imported Hugging Face OLMoE included). From it:
//! - [`metrics`]: per-layer usage entropy and maximal violation of balance, routing-path
//!   consistency across consecutive layers, how long tokens stay with an expert, transition
//!   matrices, and the cosine similarity of router weight rows;
//! - [`export`]: the long format interpretable-moes' analysis code reads (`sequence_ix, token_ix, token_id,
//!   layer_ix, topk_ix, expert, weight`) as parquet and CSV, and expert usage counts saved during
//!   training (`expert_usage.jsonl`);
//! - [`plot`]: PNG heatmaps (usage per layer, layer-to-layer transitions, usage down a tree) and usage over training;
//! - [`tree`]: metrics of a tree of experts (usage per depth, agreement below a shared parent, path entropy).
//!
//! Layers are named by their decoder-layer index (`layer_ix`), so with dense layers first the
//! first MoE layer is not 0. Counts are of (token, slot) assignments: a token adds K.
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

pub mod export;
pub mod metrics;
pub mod plot;
pub mod tree;

pub use export::{read_usage, UsageRow};
pub use metrics::{max_violation, usage_entropy, Stay};

/// Per-token routing of a set of sequences, on the host. Tokens are stored sequence-major
/// (`sequence_ix * seq_len + token_ix`), slots in the router's top-K order.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub n_experts: usize,
    pub top_k: usize,
    /// Decoder-layer index of each MoE layer, in order.
    pub layers: Vec<i64>,
    pub seq_len: usize,
    /// (N) token ids, N = sequences * seq_len.
    pub token_ids: Vec<i64>,
    /// Per MoE layer, (N * K) chosen experts.
    pub experts: Vec<Vec<i64>>,
    /// Per MoE layer, (N * K) gate weights of the chosen experts.
    pub weights: Vec<Vec<f32>>,
}

/// `t` flattened into a host vector of `kind`.
fn host<T>(t: &Tensor, kind: Kind) -> Result<Vec<T>>
where
    for<'a> Vec<T>: TryFrom<&'a Tensor, Error = tch::TchError>,
{
    let t = t.detach().to_device(Device::Cpu).to_kind(kind).flatten(0, -1).contiguous();
    Ok(Vec::<T>::try_from(&t)?)
}

impl Routing {
    pub fn new(n_experts: usize, top_k: usize, layers: Vec<i64>, seq_len: usize) -> Self {
        let n = layers.len();
        Self { n_experts, top_k, layers, seq_len, token_ids: Vec::new(), experts: vec![Vec::new(); n], weights: vec![Vec::new(); n] }
    }

    /// Appends a batch: `tokens` (B, T) and, per MoE layer in order, the chosen experts (B*T, K)
    /// and their weights (B*T, K), as the model's forward returns them (any device; one copy to
    /// the host per tensor).
    pub fn push<'a>(&mut self, tokens: &Tensor, layers: impl IntoIterator<Item = (&'a Tensor, &'a Tensor)>) -> Result<()> {
        let (b, t) = tokens.size2().map_err(|_| anyhow::anyhow!("tokens must be (B, T), got {:?}", tokens.size()))?;
        ensure!(t as usize == self.seq_len, "tokens have {t} positions per sequence, this table {}", self.seq_len);
        let n = (b * t) as usize;
        let mut got = Vec::new();
        for (idx, w) in layers {
            ensure!(idx.size() == [n as i64, self.top_k as i64], "chosen experts must be (B*T, K) = ({n}, {}), got {:?}", self.top_k, idx.size());
            ensure!(w.size() == idx.size(), "weights must match the chosen experts' shape {:?}, got {:?}", idx.size(), w.size());
            got.push((host::<i64>(idx, Kind::Int64)?, host::<f32>(w, Kind::Float)?));
        }
        ensure!(got.len() == self.layers.len(), "got routing for {} MoE layers, the table has {}", got.len(), self.layers.len());
        for (l, (e, _)) in got.iter().enumerate() {
            ensure!(
                e.iter().all(|&x| (0..self.n_experts as i64).contains(&x)),
                "layer {}: an expert id is outside 0..{}",
                self.layers[l],
                self.n_experts
            );
        }
        for (l, (e, w)) in got.into_iter().enumerate() {
            self.experts[l].extend(e);
            self.weights[l].extend(w);
        }
        self.token_ids.extend(host::<i64>(tokens, Kind::Int64)?);
        Ok(())
    }

    /// Number of tokens (all sequences).
    pub fn n_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Number of sequences.
    pub fn n_sequences(&self) -> usize {
        self.token_ids.len() / self.seq_len.max(1)
    }

    /// The experts token `n` chose at MoE layer `l` (position in `layers`), in top-K order.
    pub fn chosen(&self, l: usize, n: usize) -> &[i64] {
        &self.experts[l][n * self.top_k..(n + 1) * self.top_k]
    }

    /// (token, slot) assignments per expert, per MoE layer: (L_moe, E).
    pub fn usage(&self) -> Vec<Vec<u64>> {
        self.experts
            .iter()
            .map(|layer| {
                let mut c = vec![0u64; self.n_experts];
                for &e in layer {
                    c[e as usize] += 1;
                }
                c
            })
            .collect()
    }
}
