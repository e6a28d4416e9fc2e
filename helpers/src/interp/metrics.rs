//! Routing metrics on a [`Routing`] table and on router weights.
//!
//! - Usage entropy (nats) of each layer's share of assignments: ln E when perfectly balanced, 0
//!   when one expert takes everything.
//! - Maximal violation of balance, `MaxVio = (max_e load_e - mean load) / mean load` (Wang et al.
//!   2024, "Auxiliary-loss-free load balancing"): 0 when balanced, E - 1 when collapsed.
//! - Path consistency between consecutive MoE layers l and l+1: the fraction of tokens whose top-K
//!   sets intersect. Expert ids only mean the same thing across layers when the architecture ties
//!   them (a shared router, as in the cross-layer-experts experiment); for independent layers it is
//!   a baseline against chance (about 1 - C(E-K, K) / C(E, K)).
//! - Stay length: for each token and expert, the runs of consecutive MoE layers with the expert in
//!   the token's top-K; the mean run length and their histogram.
//! - Transition matrix between layers l and l+1: `m[a][b]` counts tokens with a in the top-K at l
//!   and b in the top-K at l+1 (optionally only tokens with chosen ids).
//! - Router cosine similarity: the (E, E) cosines of the router weight rows of one layer; the mean
//!   and the maximum off the diagonal summarise how alike the experts' keys are.
use super::Routing;
use anyhow::{ensure, Result};
use std::collections::{BTreeMap, HashSet};
use tch::{Device, Kind, Tensor};

/// Entropy (nats) of the distribution `counts / sum`; NaN when all counts are 0.
pub fn usage_entropy(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return f64::NAN;
    }
    -counts.iter().filter(|&&c| c > 0).map(|&c| c as f64 / total as f64).map(|p| p * p.ln()).sum::<f64>()
}

/// `(max - mean) / mean` of `counts`; NaN when all counts are 0.
pub fn max_violation(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 || counts.is_empty() {
        return f64::NAN;
    }
    let mean = total as f64 / counts.len() as f64;
    (*counts.iter().max().unwrap() as f64 - mean) / mean
}

/// How long tokens stay with an expert across consecutive MoE layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Stay {
    /// Mean length (in layers) of the runs.
    pub mean: f64,
    /// `runs[k]`: how many runs had length k (index 0 unused), up to the number of MoE layers.
    pub runs: Vec<u64>,
}

impl Routing {
    /// Fraction of tokens whose top-K sets at MoE layers `l` and `l + 1` intersect, for each
    /// consecutive pair (L_moe - 1 values).
    pub fn path_consistency(&self) -> Vec<f64> {
        let n = self.n_tokens();
        (0..self.layers.len().saturating_sub(1))
            .map(|l| {
                let hits = (0..n).filter(|&t| self.chosen(l, t).iter().any(|e| self.chosen(l + 1, t).contains(e))).count();
                if n == 0 {
                    f64::NAN
                } else {
                    hits as f64 / n as f64
                }
            })
            .collect()
    }

    /// Runs of consecutive MoE layers in which a token keeps an expert in its top-K.
    pub fn stay(&self) -> Stay {
        let n_layers = self.layers.len();
        let mut runs = vec![0u64; n_layers + 1];
        let mut current = vec![0usize; self.n_experts]; // per expert, the length of the open run
        for t in 0..self.n_tokens() {
            // O(L K^2) per token: only the experts chosen at this layer or the previous one change.
            // A token's slots may name an expert twice (a tree's paths share their upper edges): each
            // expert counts once per layer.
            let mut prev: Vec<i64> = vec![];
            for l in 0..n_layers {
                let mut chosen = self.chosen(l, t).to_vec();
                chosen.sort_unstable();
                chosen.dedup();
                for &e in prev.iter().filter(|e| !chosen.contains(e)) {
                    runs[current[e as usize]] += 1; // the run ends
                    current[e as usize] = 0;
                }
                for &e in &chosen {
                    current[e as usize] += 1;
                }
                prev = chosen;
            }
            for &e in &prev {
                runs[current[e as usize]] += 1;
                current[e as usize] = 0;
            }
        }
        let (count, total) = runs.iter().enumerate().fold((0u64, 0u64), |(n, s), (len, &r)| (n + r, s + r * len as u64));
        Stay { mean: if count == 0 { f64::NAN } else { total as f64 / count as f64 }, runs }
    }

    /// (E, E) transitions from MoE layer `l` (position in `layers`) to `l + 1`, over all tokens or
    /// only those whose id is in `token_ids`.
    pub fn transitions(&self, l: usize, token_ids: Option<&[i64]>) -> Result<Vec<Vec<u64>>> {
        ensure!(l + 1 < self.layers.len(), "no MoE layer after position {l} (the table has {} MoE layers)", self.layers.len());
        let keep: Option<HashSet<i64>> = token_ids.map(|ids| ids.iter().copied().collect());
        let mut m = vec![vec![0u64; self.n_experts]; self.n_experts];
        for t in 0..self.n_tokens() {
            if keep.as_ref().is_some_and(|k| !k.contains(&self.token_ids[t])) {
                continue;
            }
            for &a in self.chosen(l, t) {
                for &b in self.chosen(l + 1, t) {
                    m[a as usize][b as usize] += 1;
                }
            }
        }
        Ok(m)
    }

    /// The summary logged during training (`interp.` prefix added by the caller), per layer by its
    /// decoder index: `usage_entropy.{l}`, `max_vio.{l}`, `consistency.{l}` (l to the next MoE
    /// layer), and their means (`usage_entropy_mean`, which is also given divided by ln E as
    /// `usage_entropy_norm`, `max_vio_mean`, `consistency_mean`) and `stay_mean`.
    pub fn summary(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let usage = self.usage();
        let ent: Vec<f64> = usage.iter().map(|c| usage_entropy(c)).collect();
        let vio: Vec<f64> = usage.iter().map(|c| max_violation(c)).collect();
        let cons = self.path_consistency();
        for (i, &l) in self.layers.iter().enumerate() {
            out.insert(format!("usage_entropy.{l}"), ent[i]);
            out.insert(format!("max_vio.{l}"), vio[i]);
            if let Some(c) = cons.get(i) {
                out.insert(format!("consistency.{l}"), *c);
            }
        }
        let mean = |v: &[f64]| if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 };
        out.insert("usage_entropy_mean".into(), mean(&ent));
        out.insert("usage_entropy_norm".into(), mean(&ent) / (self.n_experts as f64).ln());
        out.insert("max_vio_mean".into(), mean(&vio));
        if !cons.is_empty() {
            out.insert("consistency_mean".into(), mean(&cons));
        }
        out.insert("stay_mean".into(), self.stay().mean);
        out
    }
}

/// (E, E) cosine similarities of the rows of a router weight `w` (E, D).
pub fn router_cosine(w: &Tensor) -> Result<Vec<Vec<f64>>> {
    ensure!(w.dim() == 2, "router weight must be (E, D), got {:?}", w.size());
    let w = w.detach().to_device(Device::Cpu).to_kind(Kind::Double);
    let unit = &w / w.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
    Ok(Vec::<Vec<f64>>::try_from(unit.matmul(&unit.tr()))?)
}

/// (mean, max) of the entries off the diagonal of a square matrix; NaN for a 1x1 one.
pub fn off_diagonal(m: &[Vec<f64>]) -> (f64, f64) {
    let vals: Vec<f64> = m.iter().enumerate().flat_map(|(i, r)| r.iter().enumerate().filter(move |(j, _)| *j != i).map(|(_, v)| *v)).collect();
    if vals.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    (vals.iter().sum::<f64>() / vals.len() as f64, vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
}

/// `router_cos_mean.{l}` and `router_cos_max.{l}` for each (decoder layer index, router weight (E, D)).
pub fn router_summary<'a>(routers: impl IntoIterator<Item = (i64, &'a Tensor)>) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for (l, w) in routers {
        let (mean, max) = off_diagonal(&router_cosine(w)?);
        out.insert(format!("router_cos_mean.{l}"), mean);
        out.insert(format!("router_cos_max.{l}"), max);
    }
    Ok(out)
}

/// The path consistency of independent uniform routing: the chance that two random K-subsets of E
/// experts intersect, `1 - C(E-K, K) / C(E, K)`.
pub fn chance_consistency(n_experts: usize, top_k: usize) -> f64 {
    if 2 * top_k > n_experts {
        return 1.0;
    }
    // C(E-K, K) / C(E, K) = prod_{i<K} (E-K-i) / (E-i)
    1.0 - (0..top_k).map(|i| (n_experts - top_k - i) as f64 / (n_experts - i) as f64).product::<f64>()
}

/// A per-layer table of a summary (as from [`Routing::summary`] plus [`router_summary`]): usage
/// entropy over ln E, MaxVio, consistency with the next MoE layer (and chance), router cosine max.
pub fn table(m: &BTreeMap<String, f64>, layers: &[i64], n_experts: usize, top_k: usize) -> String {
    let get = |k: String| m.get(&k).copied().unwrap_or(f64::NAN);
    let mut s = format!(
        "layer | usage entropy / ln E | MaxVio | consistency with next (chance {:.3}) | router cos max\n",
        chance_consistency(n_experts, top_k)
    );
    for (i, &l) in layers.iter().enumerate() {
        // the last MoE layer has no next one to agree with
        let consistency = if i + 1 == layers.len() { "(last MoE layer)".to_string() } else { format!("{:.3}", get(format!("consistency.{l}"))) };
        s += &format!(
            "{l:5} | {:20.3} | {:6.3} | {consistency:>36} | {:14.3}\n",
            get(format!("usage_entropy.{l}")) / (n_experts as f64).ln(),
            get(format!("max_vio.{l}")),
            get(format!("router_cos_max.{l}"))
        );
    }
    s + &format!("tokens stay with an expert for {:.2} consecutive MoE layers on average\n", get("stay_mean".into()))
}
