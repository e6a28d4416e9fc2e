//! Expert parallelism: each MoE layer's routed experts split over N ranks (`train.expert_parallel`).
//!
//! The run's ranks form groups of N consecutive ranks (0..N, N..2N, ...); rank r holds experts
//! `(r % N) * E/N ..` of every MoE layer, a contiguous block. A token's (token, slot) rows go to the
//! rank of their expert through an all-to-all (the row counts exchanged first), are computed
//! there, and come back through the reverse all-to-all; both exchanges are differentiable, so the
//! gate weights, sent along with the rows, stay in the autograd graph and the router learns.
//! When N is below the world size, the ranks holding the same experts (r, r+N, ...) average those
//! experts' gradients, as data parallel averages the others.
//!
//! Collectives run on CPU tensors (Gloo): rows on a GPU are copied to the host and back.
use super::{reduce_gradients, Dist, Group};
use anyhow::{ensure, Context, Result};
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

/// This rank's part in expert parallelism.
pub struct ExpertParallel {
    /// Ranks that split one copy of the experts (N).
    pub size: usize,
    /// This rank's index among them (its block of experts).
    pub index: usize,
    /// Routed experts per MoE layer (E).
    pub num_experts: i64,
    /// This rank's experts: `index * E/N .. (index + 1) * E/N`.
    pub ids: Vec<i64>,
    world: usize,
    group: Group,
    replicas: Option<Group>,
}

impl std::fmt::Display for ExpertParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "expert parallel over {} ranks: this rank holds experts {}..={} of {} in every MoE layer; {} cop{} of the experts in the run",
            self.size,
            self.ids[0],
            self.ids[self.ids.len() - 1],
            self.num_experts,
            self.world / self.size,
            if self.world / self.size == 1 { "y" } else { "ies" }
        )
    }
}

impl ExpertParallel {
    /// Splits the experts over groups of `size` ranks (None for `size` 1: every rank holds all the
    /// experts). Every rank of the run must call this, with the same arguments.
    pub fn new(dist: &Dist, size: usize, num_experts: i64) -> Result<Option<Rc<Self>>> {
        if size <= 1 {
            return Ok(None);
        }
        ensure!(
            dist.world % size == 0,
            "train.expert_parallel={size} needs a number of ranks divisible by {size}, but this run has {} (launch with bash setup.sh launch --nproc {size})",
            dist.world
        );
        ensure!(num_experts % size as i64 == 0, "train.expert_parallel={size} must divide num_experts={num_experts}");
        // Every rank creates every sub-group, in the same order; it keeps the ones it is in.
        let mut group = None;
        for g in 0..dist.world / size {
            let ranks: Vec<usize> = (g * size..(g + 1) * size).collect();
            group = dist.subgroup(&ranks)?.or(group);
        }
        let mut replicas = None;
        if dist.world > size {
            for i in 0..size {
                let ranks: Vec<usize> = (i..dist.world).step_by(size).collect();
                replicas = dist.subgroup(&ranks)?.or(replicas);
            }
        }
        let index = dist.rank % size;
        let per = num_experts / size as i64;
        Ok(Some(Rc::new(Self {
            size,
            index,
            num_experts,
            ids: (index as i64 * per..(index as i64 + 1) * per).collect(),
            world: dist.world,
            group: group.context("this rank is in no expert-parallel group")?,
            replicas,
        })))
    }

    /// Experts per rank (E/N).
    pub fn per_rank(&self) -> usize {
        self.num_experts as usize / self.size
    }

    /// Sends each of `rows` (M, C), sorted by expert, to the rank holding its expert (`counts` (E,):
    /// rows per expert, any kind or device); there `f` runs on the rows received (M', C), sorted by
    /// that rank's experts, `sizes` holding how many each of its experts got (host values), and
    /// returns (M', C'); the results come back, in `rows`' order: (M, C'). Differentiable: the
    /// gradient of the result reaches `rows` on the rank that sent them. One host read (the counts).
    /// Every rank of the group must call this for the same layer at the same time.
    pub fn exchange(&self, rows: &Tensor, counts: &Tensor, f: impl FnOnce(&Tensor, &[i64]) -> Tensor) -> Result<Tensor> {
        let (n, per) = (self.size, self.per_rank());
        let device = rows.device();
        let counts = counts.detach().to_kind(Kind::Int64).to_device(Device::Cpu).contiguous(); // (E,)
        let split = vec![per as i64; n];
        // What every rank sends to this rank's experts: (N * per,), rank-major.
        let incoming = self.group.all_to_all(&counts, &split, &split)?;
        let sent: Vec<i64> = Vec::try_from(&counts)?;
        let incoming: Vec<i64> = Vec::try_from(&incoming)?;
        let send_splits: Vec<i64> = sent.chunks(per).map(|c| c.iter().sum()).collect();
        let recv_splits: Vec<i64> = incoming.chunks(per).map(|c| c.iter().sum()).collect();
        // Rows arrive by source rank, then expert.
        let got = self.group.all_to_all(&rows.to_device(Device::Cpu).contiguous(), &recv_splits, &send_splits)?;
        // Sorted by this rank's experts (stable: by source rank within an expert).
        let expert_of: Vec<i64> = incoming.iter().enumerate().flat_map(|(i, &c)| std::iter::repeat((i % per) as i64).take(c as usize)).collect();
        let sizes: Vec<i64> = (0..per).map(|e| (0..n).map(|q| incoming[q * per + e]).sum()).collect();
        let order = Tensor::from_slice(&expert_of).argsort_stable(true, 0, false);
        let ys = f(&got.index_select(0, &order).to_device(device), &sizes).to_device(Device::Cpu);
        let ys = ys.zeros_like().index_copy(0, &order, &ys); // back in arrival order
        let back = self.group.all_to_all(&ys, &send_splits, &recv_splits)?;
        Ok(back.to_device(device))
    }

    /// The whole stack (E, ...) from every rank's rows `shard` (E/N, ...) of it, on the CPU; on
    /// every rank of the group. For checkpoints, exports and the model after training.
    pub fn gather_rows(&self, shard: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| {
            let parts: Vec<Tensor> = (0..self.size)
                .map(|q| {
                    if q == self.index {
                        shard.to_device(Device::Cpu).contiguous()
                    } else {
                        Tensor::empty(shard.size(), (shard.kind(), Device::Cpu))
                    }
                })
                .collect();
            for (q, part) in parts.iter().enumerate() {
                self.group.broadcast(std::slice::from_ref(part), q)?;
            }
            Ok(Tensor::cat(&parts, 0))
        })
    }

    /// Named tensors with this rank's shards (names holding `experts[ids]` with this rank's ids, as
    /// [`crate::placement::shard_name`] writes them) replaced by the whole stacks under the
    /// stack's name, gathered from the group; other tensors pass through. Every rank of the group
    /// must call this with the same names (up to the ids).
    pub fn gather_shards(&self, named: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        let (mut shards, mut out): (Vec<_>, Vec<_>) =
            named.into_iter().partition(|(n, _)| crate::placement::parse_shard_name(n).is_some_and(|(_, ids)| ids == self.ids));
        let whole = |n: &str| crate::placement::parse_shard_name(n).unwrap().0;
        shards.sort_by_key(|(n, _)| whole(n)); // the same order on every rank
        for (name, t) in shards {
            out.push((whole(&name), self.gather_rows(&t)?));
        }
        Ok(out)
    }

    /// Expert gradients after backward: a shard's gradient holds the contributions of the tokens of
    /// every rank of its group. Summed over the ranks that hold the same experts (when N is below
    /// the world size) and divided by the world size: the average over ranks that data parallel
    /// takes of the other gradients.
    pub fn average_gradients(&self, params: &[(String, Tensor)]) -> Result<()> {
        reduce_gradients(self.replicas.as_ref(), params, self.world as f64)
    }

    /// The norm over the whole stacks from the norm over this rank's shards: sqrt of the sum of
    /// the squares over the group (a 0-dim tensor on `local`'s device).
    pub fn norm_over_shards(&self, local: &Tensor) -> Result<Tensor> {
        let sq = local.detach().to_kind(Kind::Float).square().to_device(Device::Cpu).reshape([1]).contiguous();
        self.group.all_reduce_sum(std::slice::from_ref(&sq))?;
        Ok(sq.sqrt().reshape(Vec::<i64>::new()).to_device(local.device()))
    }
}
