//! Optimizers written over tensors, so their state can be checkpointed (tch's `nn::Optimizer`
//! cannot save state), and learning-rate schedules.
//!
//! - [`Optimizer`]: AdamW (torch's single-tensor algorithm, decoupled weight decay) and Muon
//!   (Newton-Schulz orthogonalised Nesterov momentum) over named parameters, each parameter in one
//!   [`Rule`]. Optional fp32 master weights for low-precision compute (mixed precision): the model's
//!   tensors hold the compute dtype, the optimizer keeps fp32 copies and fp32 state and writes the
//!   rounded result back after each step.
//! - [`Schedule`] and [`lr_at`]: linear warmup (from 0 or from a fraction of the peak), then cosine
//!   or linear decay to `min_lr` which holds after the end, or warmup-stable-decay.
//! - [`clip_grad_norm`]: clip a set of gradients to a maximum global norm with no host sync.
//!
//! Everything here runs on whatever device the parameters live on; nothing reads a value back to
//! the host, so a step never waits for the GPU.
use anyhow::{bail, ensure, Result};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Which update a parameter gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// AdamW with weight decay.
    AdamW,
    /// AdamW without weight decay (norms and embeddings, when configured so).
    AdamWNoDecay,
    /// Muon (hidden matrices, or stacks of them), with decoupled weight decay.
    Muon,
}

/// Hyper-parameters of both update rules. `lr` values are peaks; [`Optimizer::step`] takes the
/// schedule's multiplier.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub muon_lr: f64,
    pub muon_momentum: f64,
    pub muon_nesterov: bool,
    pub muon_ns_steps: i64,
    pub muon_weight_decay: f64,
}

struct Param {
    name: String,
    /// The model's tensor (compute dtype).
    tensor: Tensor,
    /// fp32 copy when the model computes in a lower precision and master weights are on.
    master: Option<Tensor>,
    rule: Rule,
    /// AdamW: exp_avg, exp_avg_sq. Muon: momentum buffer (one entry).
    state: Vec<Tensor>,
}

/// AdamW and Muon over named parameters, with saveable state.
pub struct Optimizer {
    pub cfg: OptimConfig,
    /// Optimizer steps taken (AdamW's bias correction uses it).
    pub step: i64,
    params: Vec<Param>,
    /// libtorch's own optimizer over the same tensors, used only for `zero_grad`: it resets
    /// gradients to undefined (PyTorch's `set_to_none=True`), which frees their memory between
    /// steps; tch has no other way to do that.
    clearer: tch::COptimizer,
}

const STATE_NAMES: [&str; 2] = ["exp_avg", "exp_avg_sq"];

impl Optimizer {
    /// `params`: (name, tensor, rule) for every trainable parameter. With `master_weights`, each
    /// parameter whose dtype is not fp32 gets an fp32 master copy (take it BEFORE casting the model
    /// down, with [`Optimizer::new`] on the fp32 model and then [`Optimizer::cast_params`]).
    pub fn new(params: Vec<(String, Tensor, Rule)>, cfg: OptimConfig) -> Result<Self> {
        let mut out = Vec::with_capacity(params.len());
        for (name, tensor, rule) in params {
            ensure!(tensor.requires_grad(), "parameter {name} does not require grad");
            if rule == Rule::Muon {
                ensure!(matches!(tensor.dim(), 2 | 3), "Muon applies to matrices (2-D) or stacks of them (3-D, e.g. stacked experts: one matrix per expert), but {name} has shape {:?}; give it an AdamW rule", tensor.size());
            }
            out.push(Param { name, tensor, master: None, rule, state: Vec::new() });
        }
        ensure!(cfg.muon_ns_steps >= 1, "muon_ns_steps must be >= 1");
        let mut clearer = tch::COptimizer::sgd(0.0, 0.0, 0.0, 0.0, false)?;
        for p in &out {
            clearer.add_parameters(&p.tensor, 0)?;
        }
        Ok(Self { cfg, step: 0, params: out, clearer })
    }

    /// Mixed precision: keeps an fp32 master copy of every parameter, then casts the model's
    /// tensors to `kind` in place (the model's structs see the new dtype). Optimizer state stays fp32.
    pub fn cast_params(&mut self, kind: Kind, keep_fp32_master: bool) {
        tch::no_grad(|| {
            for p in &mut self.params {
                if p.tensor.kind() == kind {
                    continue;
                }
                if keep_fp32_master && p.master.is_none() {
                    p.master = Some(p.tensor.detach().to_kind(Kind::Float).copy());
                }
                let lowered = p.tensor.to_kind(kind);
                p.tensor.set_data(&lowered);
            }
        });
    }

    /// Number of parameters per rule, for the run's log line.
    pub fn summary(&self) -> String {
        let count = |r: Rule| self.params.iter().filter(|p| p.rule == r).map(|p| p.tensor.numel()).sum::<usize>();
        let masters = self.params.iter().filter(|p| p.master.is_some()).count();
        let m = |n: usize| format!("{:.2}M", n as f64 / 1e6);
        let (adamw, no_decay, muon) = (count(Rule::AdamW), count(Rule::AdamWNoDecay), count(Rule::Muon));
        // only what applies: no "Muon 0.00M" in an AdamW run
        let mut parts = vec![];
        if adamw + no_decay > 0 {
            let without = if no_decay > 0 { format!(" ({} of them without weight decay)", m(no_decay)) } else { String::new() };
            parts.push(format!("AdamW on {} parameters{without}", m(adamw + no_decay)));
        }
        if muon > 0 {
            parts.push(format!("Muon on {}", m(muon)));
        }
        if masters > 0 {
            parts.push(format!("fp32 master copies of {masters} tensors"));
        }
        if parts.is_empty() { "no parameters".into() } else { parts.join("; ") }
    }

    /// Drops every gradient (set to undefined, as PyTorch's default), freeing its memory.
    pub fn zero_grad(&self) {
        self.clearer.zero_grad().expect("libtorch zero_grad");
    }

    /// One update of every parameter that has a gradient; `lr_scale` multiplies both peak rates
    /// (the schedule's value divided by the peak).
    pub fn step(&mut self, lr_scale: f64) {
        self.step += 1;
        let (c, t) = (self.cfg.clone(), self.step);
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.tensor.grad();
                if !g.defined() {
                    continue;
                }
                let mut w = match &p.master {
                    Some(m) => m.shallow_clone(),
                    None => p.tensor.shallow_clone(),
                };
                let state_kind = w.kind();
                let g = g.to_kind(state_kind);
                match p.rule {
                    Rule::AdamW | Rule::AdamWNoDecay => {
                        let wd = if p.rule == Rule::AdamW { c.weight_decay } else { 0.0 };
                        adamw_update(&mut w, &g, &mut p.state, c.lr * lr_scale, wd, &c, t);
                    }
                    Rule::Muon => muon_update(&mut w, &g, &mut p.state, c.muon_lr * lr_scale, &c),
                }
                if p.master.is_some() {
                    p.tensor.copy_(&w); // rounded to the compute dtype
                }
            }
        });
    }

    /// The parameters as the optimizer sees them: the fp32 masters where they exist. This is what
    /// a checkpoint or an export should save.
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|p| (p.name.clone(), p.master.as_ref().unwrap_or(&p.tensor).shallow_clone())).collect()
    }

    /// Gradient of every parameter that has one, by name (for gradient statistics and tests).
    pub fn grads(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|p| (p.name.clone(), p.tensor.grad())).filter(|(_, g)| g.defined()).collect()
    }

    /// The optimizer state as named tensors: `exp_avg.<param>`, `exp_avg_sq.<param>`,
    /// `momentum.<param>`, `master.<param>` for master weights, and `step` (the update count, which
    /// differs from the training step once steps have been skipped).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("step".to_string(), Tensor::from(self.step))];
        for p in &self.params {
            let names: &[&str] = if p.rule == Rule::Muon { &["momentum"] } else { &STATE_NAMES };
            for (n, s) in names.iter().zip(&p.state) {
                out.push((format!("{n}.{}", p.name), s.shallow_clone()));
            }
            if let Some(m) = &p.master {
                out.push((format!("master.{}", p.name), m.shallow_clone()));
            }
        }
        out
    }

    /// Restores what [`Optimizer::state_tensors`] produced, including the update count (`step`
    /// if the saved state lacks it). Every parameter's state must be present with the right shape
    /// (a checkpoint written after at least one update), or this is an error naming the first
    /// missing or mismatched tensor.
    pub fn load_state(&mut self, mut saved: HashMap<String, Tensor>, step: i64) -> Result<()> {
        let step = saved.remove("step").map_or(step, |t| t.int64_value(&[]));
        let mut used = std::collections::HashSet::new();
        for p in &mut self.params {
            let names: &[&str] = if p.rule == Rule::Muon { &["momentum"] } else { &STATE_NAMES };
            let mut state = Vec::new();
            for n in names {
                // Placed experts: a shard's state is cut from the saved whole stack's.
                let key = format!("{n}.{}", p.name);
                match crate::placement::lookup(&saved, &key) {
                    Some(t) => {
                        ensure!(t.size() == p.tensor.size(), "optimizer state {key} has shape {:?} but the parameter has {:?}", t.size(), p.tensor.size());
                        state.push(t.to_device(p.tensor.device())); // the state lives where its weights are
                    }
                    None if step == 0 => {}
                    None => bail!("optimizer state {key} is missing from the checkpoint (was it written with another optimizer? parameter {} uses {:?})", p.name, p.rule),
                }
                used.extend(crate::placement::sources([key.as_str()]));
            }
            p.state = state;
            let key = format!("master.{}", p.name);
            match (crate::placement::lookup(&saved, &key), &mut p.master) {
                (Some(t), Some(m)) => tch::no_grad(|| m.copy_(&t)),
                (None, Some(m)) => tch::no_grad(|| m.copy_(&p.tensor.to_kind(Kind::Float))),
                _ => {}
            }
            used.extend(crate::placement::sources([key.as_str()]));
            if let Some(m) = &p.master {
                tch::no_grad(|| p.tensor.copy_(m));
            }
        }
        saved.retain(|k, _| !used.contains(k));
        let mut extra: Vec<_> = saved.into_keys().filter(|k| !k.starts_with("master.")).collect();
        extra.sort();
        ensure!(extra.is_empty(), "the checkpoint has optimizer state for parameters this model does not have: {}", extra.join(", "));
        self.step = step;
        Ok(())
    }
}

/// torch.optim.AdamW's single-tensor update, op for op (so results match PyTorch).
fn adamw_update(w: &mut Tensor, g: &Tensor, state: &mut Vec<Tensor>, lr: f64, wd: f64, c: &OptimConfig, t: i64) {
    if state.is_empty() {
        state.push(w.zeros_like());
        state.push(w.zeros_like());
    }
    let _ = w.g_mul_scalar_(1.0 - lr * wd);
    let (m, v) = state.split_at_mut(1);
    let _ = m[0].lerp_(g, 1.0 - c.beta1);
    let _ = v[0].g_mul_scalar_(c.beta2);
    let _ = v[0].addcmul_(&(g * (1.0 - c.beta2)), g);
    let bc1 = 1.0 - c.beta1.powi(t as i32);
    let bc2 = 1.0 - c.beta2.powi(t as i32);
    let step_size = lr / bc1;
    let denom = (v[0].sqrt() / bc2.sqrt()) + c.eps;
    let _ = w.addcdiv_(&(&m[0] * -step_size), &denom);
}

/// Muon (Keller Jordan, 2024): momentum (Nesterov optional), orthogonalise the update with a
/// quintic Newton-Schulz iteration, scale the rate by sqrt(max(1, rows/cols)) ("original" in
/// torch.optim.Muon), and apply decoupled weight decay with the unscaled rate, as torch does.
fn muon_update(w: &mut Tensor, g: &Tensor, state: &mut Vec<Tensor>, lr: f64, c: &OptimConfig) {
    if state.is_empty() {
        state.push(w.zeros_like());
    }
    let buf = &mut state[0];
    let _ = buf.lerp_(g, 1.0 - c.muon_momentum);
    let update = if c.muon_nesterov { g.lerp(buf, c.muon_momentum) } else { buf.shallow_clone() };
    let o = newton_schulz(&update, c.muon_ns_steps); // bf16
    let (rows, cols) = (w.size()[w.dim() - 2] as f64, w.size()[w.dim() - 1] as f64);
    let scale = (rows / cols).max(1.0).sqrt();
    let _ = w.g_mul_scalar_(1.0 - lr * c.muon_weight_decay);
    let _ = w.g_add_(&(o.to_kind(w.kind()) * (-lr * scale)));
}

/// Approximately U V^T of G = U S V^T: quintic Newton-Schulz iterations with the coefficients
/// (3.4445, -4.7750, 2.0315), in bf16, op for op as `torch.optim.Muon` (so results match PyTorch).
/// A 3-D `g` is a stack of matrices (stacked experts), each orthogonalised on its own.
pub fn newton_schulz(g: &Tensor, steps: i64) -> Tensor {
    let (a, b, c) = (3.4445, -4.7750, 2.0315);
    let stacked = g.dim() == 3;
    let mut x = g.to_kind(Kind::BFloat16);
    let tall = x.size()[x.dim() - 2] > x.size()[x.dim() - 1];
    if tall {
        x = x.transpose(-2, -1);
    }
    // spectral norm <= 1: each matrix divided by its Frobenius norm
    x = if stacked { &x / x.norm_scalaropt_dim(2, [-2, -1], true).clamp_min(1e-7) } else { &x / x.norm().clamp_min(1e-7) };
    let mut x3 = if stacked { x } else { x.unsqueeze(0) }; // (B, rows, cols)
    for _ in 0..steps {
        // Rust note: baddbmm(beta, alpha) on a batch of one is torch.addmm(input, m1, m2, beta, alpha).
        let gram = x3.matmul(&x3.transpose(1, 2)); // (B, rows, rows)
        let update = gram.baddbmm(&gram, &gram, b, c); // b G + c G G
        x3 = x3.baddbmm(&update, &x3, a, 1.0); // a X + (b G + c G G) X
    }
    let mut x = if stacked { x3 } else { x3.squeeze_dim(0) };
    if tall {
        x = x.transpose(-2, -1);
    }
    x
}

/// Gradient norms (before clipping) as metrics: `grad_norm.global`, per group
/// (`grad_norm.group.<group(name)>`), per layer (`grad_norm.layer.<l>` for `model.layers.<l>.`), per
/// routed expert (`grad_norm.expert.<l>.<e>`: each row of a tensor of the group "experts", the stacked
/// experts or a placed shard of them), and `grad.nonfinite_count`. One transfer to the host for all.
pub fn grad_norm_metrics(grads: &[(String, Tensor)], group: impl Fn(&str) -> &'static str) -> serde_json::Map<String, serde_json::Value> {
    let Some(primary) = grads.first().map(|(_, g)| g.device()) else { return Default::default() }; // experts may live on other devices
    let (mut keys, mut sq, mut bad): (Vec<String>, Vec<Tensor>, Vec<Tensor>) = Default::default();
    for (name, g) in grads {
        let g2 = g.to_kind(Kind::Float).square();
        let total = g2.sum(Kind::Float).to_device(primary);
        let layer = name.strip_prefix("model.layers.").and_then(|r| r.split('.').next());
        let mut k = vec!["grad_norm.global".to_string(), format!("grad_norm.group.{}", group(name))];
        k.extend(layer.map(|l| format!("grad_norm.layer.{l}")));
        for key in k {
            keys.push(key);
            sq.push(total.shallow_clone());
        }
        if let (Some(l), "experts", true) = (layer, group(name), g.dim() == 3) {
            let ids = crate::placement::parse_shard_name(name).map_or_else(|| (0..g.size()[0]).collect(), |(_, ids)| ids);
            let rows = g2.sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Float).to_device(primary); // (e,)
            for (r, id) in ids.iter().enumerate() {
                keys.push(format!("grad_norm.expert.{l}.{id}"));
                sq.push(rows.get(r as i64));
            }
        }
        bad.push(g.isfinite().logical_not().sum(Kind::Float).to_device(primary));
    }
    let sq: Vec<f64> = Vec::try_from(Tensor::stack(&sq, 0).to_kind(Kind::Double)).unwrap();
    let bad: f64 = Tensor::stack(&bad, 0).sum(Kind::Float).double_value(&[]);
    let mut acc: std::collections::BTreeMap<String, f64> = Default::default();
    for (k, v) in keys.iter().zip(&sq) {
        *acc.entry(k.clone()).or_default() += v;
    }
    let mut m: serde_json::Map<String, serde_json::Value> = acc.into_iter().map(|(k, v)| (k, v.sqrt().into())).collect();
    m.insert("grad.nonfinite_count".into(), bad.into());
    m
}

/// Scales the gradients of `params` so their global L2 norm is at most `max` (0 = no clipping);
/// returns the norm before clipping as a 0-dim fp32 tensor on the parameters' device. No host sync.
pub fn clip_grad_norm(params: &[Tensor], max: f64) -> Tensor {
    let total = grad_norm(params);
    clip_grads_to(params, &total, max);
    total
}

/// The L2 norm of the gradients of `params` (0 when none has one), gathered on the first
/// parameter's device (experts may live on other devices). No host sync.
pub fn grad_norm(params: &[Tensor]) -> Tensor {
    tch::no_grad(|| {
        let dev = params.first().map(|p| p.device()).unwrap_or(tch::Device::Cpu);
        let norms: Vec<Tensor> = params.iter().map(|p| p.grad()).filter(|g| g.defined()).map(|g| g.to_kind(Kind::Float).norm().to_device(dev)).collect();
        if norms.is_empty() {
            return Tensor::from(0f32);
        }
        Tensor::stack(&norms, 0).norm() // ()
    })
}

/// Scales the gradients of `params` by min(1, max / (total + 1e-6)), `total` being their norm
/// (from [`grad_norm`], or over more than this process holds); `max` <= 0: no clipping.
pub fn clip_grads_to(params: &[Tensor], total: &Tensor, max: f64) {
    if max <= 0.0 {
        return;
    }
    tch::no_grad(|| {
        let scale = (max / (total + 1e-6)).clamp_max(1.0);
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.g_mul_(&scale.to_kind(g.kind()).to_device(g.device()));
            }
        }
    })
}

/// The decay after warmup (in configs: "cosine", "linear", "wsd").
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Half cosine from lr to min_lr over `decay_steps`.
    Cosine,
    /// Straight line from lr to min_lr over `decay_steps`.
    Linear,
    /// Warmup-stable-decay: lr until the last `decay_steps` of the run, then linear to min_lr.
    Wsd,
}

impl std::str::FromStr for Decay {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "cosine" => Self::Cosine,
            "linear" => Self::Linear,
            "wsd" => Self::Wsd,
            _ => bail!("unknown schedule {s:?}; choose cosine, linear or wsd"),
        })
    }
}

/// A learning-rate schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub decay: Decay,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: i64,
    /// Warmup starts at this fraction of lr (0 = from zero; interpretable-moes: 0.2).
    pub warmup_start_frac: f64,
    /// Cosine / linear: decay length after warmup (0 = until max_steps). WSD: length of the final
    /// decay (0 = the last 20% of max_steps).
    pub decay_steps: i64,
    pub max_steps: i64,
}

/// Learning rate for optimizer step `step` (0-based). Warmup: lr * (f + (1 - f) (step + 1) / W).
/// After the decay ends the rate stays at min_lr (interpretable-moes' cosine rose again; this one does not).
pub fn lr_at(step: i64, s: &Schedule) -> f64 {
    if step < s.warmup_steps {
        let f = s.warmup_start_frac;
        return s.lr * (f + (1.0 - f) * (step + 1) as f64 / s.warmup_steps as f64);
    }
    let line = |p: f64| s.lr + (s.min_lr - s.lr) * p.clamp(0.0, 1.0);
    match s.decay {
        Decay::Cosine | Decay::Linear => {
            let len = if s.decay_steps > 0 { s.decay_steps } else { (s.max_steps - s.warmup_steps).max(1) };
            let p = ((step - s.warmup_steps) as f64 / len as f64).min(1.0);
            if s.decay == Decay::Cosine {
                s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
            } else {
                line(p)
            }
        }
        Decay::Wsd => {
            let len = if s.decay_steps > 0 { s.decay_steps } else { (s.max_steps / 5).max(1) };
            let start = (s.max_steps - len).max(s.warmup_steps);
            if step < start { s.lr } else { line((step - start + 1) as f64 / len as f64) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: Decay) -> Schedule {
        Schedule { decay, lr: 1.0, min_lr: 0.1, warmup_steps: 10, warmup_start_frac: 0.0, decay_steps: 0, max_steps: 110 }
    }

    #[test]
    fn warmup_reaches_peak_and_starts_at_fraction() {
        let s = sched(Decay::Cosine);
        assert!((lr_at(0, &s) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, &s) - 1.0).abs() < 1e-12);
        let s = Schedule { warmup_start_frac: 0.2, ..s };
        assert!((lr_at(0, &s) - (0.2 + 0.8 * 0.1)).abs() < 1e-12);
    }

    #[test]
    fn cosine_and_linear_end_at_min_lr_and_stay_there() {
        for d in [Decay::Cosine, Decay::Linear] {
            let s = sched(d);
            assert!((lr_at(10, &s) - 1.0).abs() < 1e-12);
            assert!((lr_at(60, &s) - 0.55).abs() < 1e-12, "{d:?} midpoint");
            for step in [110, 111, 500] {
                assert!((lr_at(step, &s) - 0.1).abs() < 1e-12, "{d:?} after the end");
            }
        }
        let s = Schedule { decay_steps: 20, ..sched(Decay::Cosine) };
        assert!((lr_at(30, &s) - 0.1).abs() < 1e-12 && (lr_at(100, &s) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn wsd_is_flat_then_decays_in_the_last_fifth() {
        let s = sched(Decay::Wsd);
        assert_eq!(lr_at(50, &s), 1.0);
        assert_eq!(lr_at(87, &s), 1.0);
        assert!(lr_at(88, &s) < 1.0);
        assert!((lr_at(109, &s) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn newton_schulz_is_nearly_orthogonal() {
        tch::manual_seed(0);
        let g = Tensor::randn([32, 64], (Kind::Float, tch::Device::Cpu));
        let o = newton_schulz(&g, 5).to_kind(Kind::Float); // bf16, as torch.optim.Muon
        // Singular values land in roughly [0.7, 1.2] (the iteration trades exactness for speed).
        let sv = o.matmul(&o.tr()).linalg_eigvalsh("L").sqrt(); // singular values of O
        let (lo, hi) = (sv.min().double_value(&[]), sv.max().double_value(&[]));
        assert!(lo > 0.5 && hi < 1.3, "singular values in [{lo}, {hi}]");
        let tall = newton_schulz(&g.tr(), 5);
        assert_eq!(tall.size(), vec![64, 32]);
        // A stack (stacked experts' weights): each matrix orthogonalised on its own.
        let stack = Tensor::stack(&[&g, &(&g * 3.0).flip([1])], 0).transpose(1, 2); // (2, 64, 32): tall
        let o = newton_schulz(&stack, 5).to_kind(Kind::Float);
        for j in 0..2 {
            let alone = newton_schulz(&stack.get(j), 5).to_kind(Kind::Float);
            let diff = (&o.get(j) - &alone).abs().max().double_value(&[]);
            assert!(diff < 2e-2, "matrix {j} of the stack differs from itself alone by {diff}");
        }
    }
}
