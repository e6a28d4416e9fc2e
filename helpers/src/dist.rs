//! Past one process: PyTorch's own c10d (the engine of torchrun, DDP, FSDP and torchtitan) through
//! a small C++ shim (`csrc/dist.cpp`, compiled by `build.rs`). Gloo carries the collectives (CPU
//! tensors; the tests run 2 ranks on 127.0.0.1).
//!
//! A program launched by `torchrun` (or `bash setup.sh launch`) finds RANK, WORLD_SIZE, LOCAL_RANK,
//! LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its environment; [`Dist::from_env`] joins the
//! run from them. Without WORLD_SIZE (a notebook, a plain program) it is one process and every call
//! below returns at once, so the training loop is written once for both.
//!
//! Every collective is bounded by a timeout (`MOE_DIST_TIMEOUT`, seconds, default 300) and fails
//! with an error that names this rank and the operation; a C++ exception comes back as an
//! `anyhow` error, never an abort.
use anyhow::{bail, ensure, Context, Result};
use std::cell::Cell;
use std::rc::Rc;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

pub mod ep;
pub use ep::ExpertParallel;

extern "C" {
    fn moe_dist_free_string(s: *mut c_char);
    fn moe_dist_init(host: *const c_char, port: c_int, rank: c_int, size: c_int, serve_store: c_int, prefix: *const c_char, timeout_ms: i64, out: *mut *mut c_void) -> *mut c_char;
    fn moe_dist_subgroup(parent: *mut c_void, ranks: *const i64, n: i64, out: *mut *mut c_void) -> *mut c_char;
    fn moe_dist_free(g: *mut c_void);
    fn moe_dist_all_reduce(g: *mut c_void, tensors: *const *mut torch_sys::C_tensor, n: i64, op: c_int) -> *mut c_char;
    fn moe_dist_broadcast(g: *mut c_void, tensors: *const *mut torch_sys::C_tensor, n: i64, root: c_int) -> *mut c_char;
    fn moe_dist_barrier(g: *mut c_void) -> *mut c_char;
    fn moe_dist_all_to_all(g: *mut c_void, input: *mut torch_sys::C_tensor, out_splits: *const i64, in_splits: *const i64, out: *mut *mut torch_sys::C_tensor) -> *mut c_char;
}

/// Gradients are all-reduced in buckets of about this many bytes (DDP's default is 25 MB): few
/// enough calls to keep per-call latency small, small enough that Gloo's threads overlap them.
pub const BUCKET_BYTES: usize = 25 << 20;

/// A set of ranks that run collectives together (the whole run, or a sub-group).
pub struct Group {
    ptr: *mut c_void,
    /// This process's index in the group.
    pub rank: usize,
    /// Number of ranks in the group.
    pub size: usize,
    /// The run's rank of this process and world size, for error messages.
    global: (usize, usize),
    timeout: Duration,
    /// Seconds in collectives, shared with the group's sub-groups (one figure for the run).
    comm: Rc<Cell<f64>>,
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: ptr came from moe_dist_init / moe_dist_subgroup and is freed once, here.
        unsafe { moe_dist_free(self.ptr) }
    }
}

/// Where this process stands in the run.
pub struct Dist {
    /// This process's rank, 0..world.
    pub rank: usize,
    /// Number of processes in the run (1: a single process, no group).
    pub world: usize,
    /// This process's index on its node (its GPU is `cuda:local_rank`).
    pub local_rank: usize,
    /// Processes on this node (CPU threads are divided among them).
    pub local_world: usize,
    group: Option<Group>,
}

impl std::fmt::Display for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.group {
            None => write!(f, "one process"),
            Some(_) => write!(f, "rank {} of {} (local rank {} of {}), Gloo", self.rank, self.world, self.local_rank, self.local_world),
        }
    }
}

fn env_usize(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(s) => Ok(Some(s.trim().parse().with_context(|| format!("{name}={s:?} is not a non-negative integer"))?)),
        Err(_) => Ok(None),
    }
}

/// `MOE_DIST_TIMEOUT` (seconds), default 300.
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var("MOE_DIST_TIMEOUT") {
        Ok(s) => {
            let secs: f64 = s.trim().parse().ok().filter(|&x: &f64| x > 0.0).with_context(|| format!("MOE_DIST_TIMEOUT={s:?} is not a positive number of seconds"))?;
            Ok(Duration::from_secs_f64(secs))
        }
        Err(_) => Ok(Duration::from_secs(300)),
    }
}

/// Takes the shim's error string (NULL: success).
fn check(err: *mut c_char) -> std::result::Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a malloc'd, NUL-terminated string from the shim, freed once here.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { moe_dist_free_string(err) };
    Err(msg)
}

impl Dist {
    /// A single process: no group; every collective is a no-op.
    pub fn single() -> Self {
        Self { rank: 0, world: 1, local_rank: 0, local_world: 1, group: None }
    }

    /// Joins the run torchrun describes in the environment, or [`Dist::single`] without WORLD_SIZE
    /// (or with WORLD_SIZE=1). Under torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE=True) the
    /// agent serves the store; otherwise rank 0 does, at MASTER_ADDR:MASTER_PORT.
    pub fn from_env() -> Result<Self> {
        let world = env_usize("WORLD_SIZE")?.unwrap_or(1);
        if world <= 1 {
            return Ok(Self::single());
        }
        let rank = env_usize("RANK")?.context("WORLD_SIZE is set but RANK is not: launch with torchrun or bash setup.sh launch")?;
        ensure!(rank < world, "RANK={rank} is not below WORLD_SIZE={world}");
        let local_rank = env_usize("LOCAL_RANK")?.unwrap_or(rank);
        let local_world = env_usize("LOCAL_WORLD_SIZE")?.unwrap_or(world);
        let host = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
        let port = env_usize("MASTER_PORT")?.context("WORLD_SIZE is set but MASTER_PORT is not: launch with torchrun or bash setup.sh launch")?;
        let agent_store = std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        let attempt = std::env::var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|_| "0".into());
        let timeout = timeout_from_env()?;
        let group = Group::init(&host, port, rank, world, rank == 0 && !agent_store, &format!("/worker/attempt_{attempt}"), timeout)?;
        Ok(Self { rank, world, local_rank, local_world, group: Some(group) })
    }

    /// True on rank 0, the one rank that writes checkpoints, metrics, plots and W&B.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The run's group (None in a single process).
    pub fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    /// Seconds this process has spent in collectives so far (for the speed figures).
    pub fn comm_seconds(&self) -> f64 {
        self.group.as_ref().map_or(0.0, |g| g.comm.get())
    }

    /// Every rank's copy of `tensors` becomes rank 0's (weights at the start of training).
    pub fn broadcast_from_main(&self, tensors: &[Tensor]) -> Result<()> {
        match &self.group {
            Some(g) => tch::no_grad(|| g.broadcast(tensors, 0)),
            None => Ok(()),
        }
    }

    /// Every rank's variables of `vs` (by name) become rank 0's: the same weights everywhere before
    /// training, whatever each process's init or load did.
    pub fn broadcast_variables(&self, vs: &tch::nn::VarStore) -> Result<()> {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0)); // the same order on every rank
        self.broadcast_from_main(&vars.into_iter().map(|(_, t)| t).collect::<Vec<_>>())
    }

    /// Ranks other than 0 end here (exit status 0): what follows in a program (results, plots,
    /// export) is rank 0's job. Rank 0 and a single process go on.
    pub fn end_other_ranks(&self) {
        if !self.is_main() {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::process::exit(0);
        }
    }

    /// Sums each tensor over ranks, in place.
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        self.group.as_ref().map_or(Ok(()), |g| g.all_reduce(tensors, Reduce::Sum))
    }

    /// Averages each tensor over ranks, in place.
    pub fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        g.all_reduce(tensors, Reduce::Sum)?;
        tch::no_grad(|| -> Result<()> {
            for t in tensors {
                let _ = t.shallow_clone().f_div_scalar_(g.size as f64)?;
            }
            Ok(())
        })
    }

    /// Data parallel: averages the gradients of `params` over ranks (as DDP does), in buckets of
    /// about [`BUCKET_BYTES`] flattened into one buffer each. A parameter without a gradient on
    /// this rank gets a zero one first, so every rank sends the same buckets.
    pub fn average_gradients(&self, params: &[(String, Tensor)]) -> Result<()> {
        match &self.group {
            Some(g) => reduce_gradients(Some(g), params, g.size as f64),
            None => Ok(()),
        }
    }

    /// Runs `f` on rank 0 first, then on the first rank of each other node, then on the other ranks,
    /// with a barrier after each turn: work that fills a cache on disk (the data shards) is done once
    /// per file system, and the later turns find it done instead of racing to write the same files.
    /// In one process: `f()`.
    pub fn in_turn<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        if self.group.is_none() {
            return f();
        }
        let turn = if self.rank == 0 { 0 } else if self.local_rank == 0 { 1 } else { 2 };
        let mut out = None;
        for t in 0..3 {
            if t == turn {
                // An error ends this rank; the others then fail at the barrier, naming it.
                out = Some(f()?);
            }
            self.barrier()?;
        }
        Ok(out.unwrap())
    }

    /// Waits until every rank gets here.
    pub fn barrier(&self) -> Result<()> {
        self.group.as_ref().map_or(Ok(()), |g| g.barrier())
    }

    /// A group of some of the run's ranks (ascending, no repeats): every rank calls this with the
    /// same list, in the same order as the other ranks; members get their group, others None.
    pub fn subgroup(&self, ranks: &[usize]) -> Result<Option<Group>> {
        match &self.group {
            Some(g) => g.subgroup(ranks),
            None => {
                ensure!(ranks == [0], "a single process has only rank 0, not {ranks:?}");
                Ok(None)
            }
        }
    }
}

/// Sums the gradients of `params` over `group` (none: this rank alone) and divides them by
/// `divisor`, in place, in buckets of about [`BUCKET_BYTES`] flattened into one buffer each. A
/// parameter without a gradient on this rank gets a zero one first, so every rank sends the same
/// buckets.
pub(crate) fn reduce_gradients(group: Option<&Group>, params: &[(String, Tensor)], divisor: f64) -> Result<()> {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|(_, p)| {
            if !p.grad().defined() {
                (p.sum(p.kind()) * 0.0).backward(); // a zero gradient, so buckets agree across ranks
            }
            p.grad()
        })
        .collect();
    tch::no_grad(|| -> Result<()> {
        // Buckets of one dtype and device, in parameter order (the same on every rank).
        let mut buckets: Vec<Vec<&Tensor>> = Vec::new();
        let (mut bytes, mut key) = (0usize, None::<(Kind, Device)>);
        for t in &grads {
            let k = (t.kind(), t.device());
            let b = t.numel() * t.kind().elt_size_in_bytes();
            if buckets.is_empty() || key != Some(k) || bytes + b > BUCKET_BYTES {
                buckets.push(Vec::new());
                bytes = 0;
                key = Some(k);
            }
            buckets.last_mut().unwrap().push(t);
            bytes += b;
        }
        let flats: Vec<Tensor> = buckets.iter().map(|b| Tensor::cat(&b.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0)).collect();
        if let Some(g) = group {
            g.all_reduce(&flats, Reduce::Sum)?;
        }
        for (bucket, flat) in buckets.iter().zip(&flats) {
            let flat = flat / divisor;
            let mut offset = 0i64;
            for t in bucket {
                let n = t.numel() as i64;
                t.f_view([-1]).context("gradients must be contiguous")?.copy_(&flat.narrow(0, offset, n));
                offset += n;
            }
        }
        Ok(())
    })
}

#[derive(Clone, Copy)]
enum Reduce {
    Sum = 0,
}

impl Group {
    fn init(host: &str, port: usize, rank: usize, size: usize, serve_store: bool, prefix: &str, timeout: Duration) -> Result<Self> {
        let (h, p) = (CString::new(host)?, CString::new(prefix)?);
        let mut ptr = std::ptr::null_mut();
        // SAFETY: valid C strings, an out pointer; the shim catches every C++ exception.
        let err = unsafe { moe_dist_init(h.as_ptr(), port as c_int, rank as c_int, size as c_int, serve_store as c_int, p.as_ptr(), timeout.as_millis() as i64, &mut ptr) };
        check(err).map_err(|e| {
            anyhow::anyhow!("rank {rank} of {size}: joining the run at {host}:{port} failed within {}s: {e}. Are all {size} ranks started, with the same MASTER_ADDR and MASTER_PORT?", timeout.as_secs())
        })?;
        Ok(Self { ptr, rank, size, global: (rank, size), timeout, comm: Rc::new(Cell::new(0.0)) })
    }

    /// The error a failed collective becomes: which rank, which operation, and what to check.
    fn fail(&self, op: &str, e: String) -> anyhow::Error {
        anyhow::anyhow!(
            "rank {} of {}: {op} failed: {e}. Another rank probably stopped first (see its output) or did not reach the same collective within MOE_DIST_TIMEOUT={}s",
            self.global.0, self.global.1, self.timeout.as_secs()
        )
    }

    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = f();
        self.comm.set(self.comm.get() + t0.elapsed().as_secs_f64());
        out
    }

    fn ptrs(tensors: &[Tensor]) -> Result<Vec<*mut torch_sys::C_tensor>> {
        for t in tensors {
            ensure!(t.is_contiguous(), "collectives need contiguous tensors (got a strided one of shape {:?})", t.size());
        }
        Ok(tensors.iter().map(|t| t.as_ptr() as *mut _).collect())
    }

    fn all_reduce(&self, tensors: &[Tensor], op: Reduce) -> Result<()> {
        let ptrs = Self::ptrs(tensors)?;
        // SAFETY: live tensors for the duration of the call.
        let err = self.timed(|| unsafe { moe_dist_all_reduce(self.ptr, ptrs.as_ptr(), ptrs.len() as i64, op as c_int) });
        check(err).map_err(|e| self.fail("all_reduce", e))
    }

    /// Copies `root`'s values of each tensor into every rank's, in place.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        ensure!(root < self.size, "broadcast root {root} is not a rank of a group of {}", self.size);
        let ptrs = Self::ptrs(tensors)?;
        // SAFETY: as above.
        let err = self.timed(|| unsafe { moe_dist_broadcast(self.ptr, ptrs.as_ptr(), ptrs.len() as i64, root as c_int) });
        check(err).map_err(|e| self.fail("broadcast", e))
    }

    /// Sums each tensor over the group's ranks, in place.
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        self.all_reduce(tensors, Reduce::Sum)
    }

    /// Waits until every rank of the group gets here.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a live group.
        let err = self.timed(|| unsafe { moe_dist_barrier(self.ptr) });
        check(err).map_err(|e| self.fail("barrier", e))
    }

    /// Rows of `x` (first dimension split by `in_splits`, one block per rank, in rank order) go to
    /// their ranks; returns the rows received (`out_splits[r]` from rank r). Differentiable: the
    /// gradient of the received rows goes back to the ranks that sent them.
    pub fn all_to_all(&self, x: &Tensor, out_splits: &[i64], in_splits: &[i64]) -> Result<Tensor> {
        ensure!(out_splits.len() == self.size && in_splits.len() == self.size, "all_to_all needs one split per rank ({}), got {} and {}", self.size, out_splits.len(), in_splits.len());
        let mut out = std::ptr::null_mut();
        // SAFETY: a live tensor and split arrays of `size` entries; the shim returns a new tensor.
        let err = self.timed(|| unsafe { moe_dist_all_to_all(self.ptr, x.as_ptr() as *mut _, out_splits.as_ptr(), in_splits.as_ptr(), &mut out) });
        check(err).map_err(|e| self.fail("all_to_all", e))?;
        // SAFETY: `out` is a new at::Tensor* owned by us from here.
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// See [`Dist::subgroup`].
    pub fn subgroup(&self, ranks: &[usize]) -> Result<Option<Group>> {
        if ranks.windows(2).any(|w| w[0] >= w[1]) || ranks.iter().any(|&r| r >= self.size) || ranks.is_empty() {
            bail!("a sub-group needs ascending, distinct ranks below {}, got {ranks:?}", self.size);
        }
        let r: Vec<i64> = ranks.iter().map(|&r| r as i64).collect();
        let mut ptr = std::ptr::null_mut();
        // SAFETY: a live parent group and `r.len()` ranks.
        let err = unsafe { moe_dist_subgroup(self.ptr, r.as_ptr(), r.len() as i64, &mut ptr) };
        check(err).map_err(|e| self.fail("subgroup", e))?;
        Ok((!ptr.is_null()).then(|| Self {
            ptr,
            rank: ranks.iter().position(|&x| x == self.rank).unwrap(),
            size: ranks.len(),
            global: self.global,
            timeout: self.timeout,
            comm: self.comm.clone(),
        }))
    }
}
