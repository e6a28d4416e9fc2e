//! Routing metrics of a tree of experts (experiments/hierarchical-experts): every MoE layer's
//! experts are the edges of a complete tree with `b` children per node and depth `n`, in heap order
//! (node i's branch c is expert b i + c; the experts of depth d are the block
//! [offset(d), offset(d) + b^d)). A token's slots are its K leaf paths, n experts each, path-major,
//! the most probable path first.
//!
//! Per MoE layer (keys as in [`super::metrics`], the layer's decoder index last):
//! - `tree.usage_entropy.<d>.<layer>`: entropy of the depth-d experts' shares of the (token, path)
//!   slots, over ln b^d (1 = every expert of that depth equally used);
//! - `tree.agreement.<d>.<layer>` (d < n): of two tokens whose most probable paths share their
//!   depth-d expert, the probability they also share the depth-(d+1) expert (the sum over each
//!   node's children of their squared shares, weighted by the node's tokens); 1/b if the choice
//!   below were independent of the one above and uniform, 1 when a parent decides its child;
//! - `tree.path_entropy.<layer>`: entropy of the most probable leaf path over ln b^n.
use super::Routing;
use anyhow::{ensure, Result};
use std::collections::BTreeMap;

/// The shape of a complete tree: `b` branches per node, depth `n`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tree {
    pub b: usize,
    pub n: usize,
}

impl Tree {
    /// Experts (edges) of the tree: b + b^2 + ... + b^n.
    pub fn experts(&self) -> usize {
        (1..=self.n).map(|d| self.b.pow(d as u32)).sum()
    }
    /// The first expert of depth d (1 = under the root).
    pub fn offset(&self, d: usize) -> usize {
        (1..d).map(|j| self.b.pow(j as u32)).sum()
    }

    /// The metrics of the module docs for every MoE layer of `routing`.
    pub fn metrics(&self, routing: &Routing) -> Result<BTreeMap<String, f64>> {
        let (b, n) = (self.b, self.n);
        ensure!(routing.n_experts == self.experts(), "the routing has {} experts, a tree of b = {b}, n = {n} has {}", routing.n_experts, self.experts());
        ensure!(routing.top_k % n == 0, "{} slots per token are not whole paths of {n} experts", routing.top_k);
        let entropy = |counts: &[f64]| {
            let total: f64 = counts.iter().sum();
            if total == 0.0 {
                return f64::NAN;
            }
            -counts.iter().filter(|&&c| c > 0.0).map(|c| c / total * (c / total).ln()).sum::<f64>()
        };
        let mut out = BTreeMap::new();
        for (l, &layer) in routing.layers.iter().enumerate() {
            let mut slots = vec![0f64; self.experts()];
            let mut top_paths = vec![0f64; b.pow(n as u32)];
            let mut top_edges = vec![0f64; self.experts()]; // tokens whose most probable path uses the edge
            for t in 0..routing.n_tokens() {
                let chosen = routing.chosen(l, t);
                for &e in chosen {
                    slots[e as usize] += 1.0;
                }
                let top = &chosen[..n];
                for &e in top {
                    top_edges[e as usize] += 1.0;
                }
                // The leaf path's index: its branches as base-b digits, the first decision first.
                let leaf = top.iter().enumerate().fold(0, |p, (d, &e)| p * b + (e as usize - self.offset(d + 1)) % b);
                top_paths[leaf] += 1.0;
            }
            for d in 1..=n {
                let block = &slots[self.offset(d)..self.offset(d) + b.pow(d as u32)];
                out.insert(format!("tree.usage_entropy.{d}.{layer}"), entropy(block) / (b.pow(d as u32) as f64).ln());
            }
            for d in 1..n {
                // Node of depth d reached by edge e: e + 1; its children's edges: b (e + 1) + c.
                let (mut same, mut total) = (0.0, 0.0);
                for e in self.offset(d)..self.offset(d) + b.pow(d as u32) {
                    let through = top_edges[e];
                    if through == 0.0 {
                        continue;
                    }
                    let children: f64 = (0..b).map(|c| (top_edges[b * (e + 1) + c] / through).powi(2)).sum();
                    same += through * children;
                    total += through;
                }
                out.insert(format!("tree.agreement.{d}.{layer}"), if total == 0.0 { f64::NAN } else { same / total });
            }
            out.insert(format!("tree.path_entropy.{layer}"), entropy(&top_paths) / (top_paths.len() as f64).ln());
        }
        Ok(out)
    }
}
