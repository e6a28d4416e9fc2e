//! Training checkpoints that survive crashes: written atomically, kept last-N, resumed exactly.
//!
//! Layout inside a run directory:
//! ```text
//! checkpoints/
//!   step-00000500/  model.safetensors  optimizer.safetensors  state.json
//!   step-00001000/  ...
//!   latest          "step-00001000"   (written last, atomically)
//! ```
//! A checkpoint directory is assembled under a hidden temporary name, every file is fsynced, and
//! only then renamed into place; `latest` is replaced (temporary file + rename) after that. A kill
//! at any moment therefore leaves `latest` naming a complete checkpoint: the new one or the one
//! before. Leftover temporary directories from a kill are removed by the next save.
//!
//! `state.json` holds everything that is not a tensor: step, tokens trained, data position, the
//! RNG rule, the full config, the W&B run id, the skipped-step count.
use crate::run::write_atomic;
use crate::WithCause;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Everything in a checkpoint that is not a tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed; the next step to run has this 0-based index.
    pub step: i64,
    /// Tokens trained on so far.
    pub tokens: i64,
    /// Index of the next micro-batch to draw (batches depend only on (seed, index)).
    pub data_position: u64,
    /// Seed of the run; the global RNG is re-seeded from (seed, step) at the start of every step
    /// (see [`step_seed`]), so this and `step` are the whole RNG state.
    pub seed: u64,
    /// Steps skipped because of a non-finite loss or gradient.
    pub skipped_steps: i64,
    /// The run's W&B id, so a resumed run continues the same W&B run.
    pub wandb_run_id: Option<String>,
    /// The full config (`{"model": ..., "train": ...}`) the run was started with.
    pub config: serde_json::Value,
    /// Processes that trained it (data parallel): `data_position` counts each rank's micro-batches,
    /// so a resume needs the same number. 1 in checkpoints written before launches existed.
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

/// The seed of the global RNG for optimizer step `step`: resuming at any step reproduces the
/// random numbers an uninterrupted run would draw there (tch cannot read libtorch's RNG state).
pub fn step_seed(seed: u64, step: i64) -> i64 {
    // SplitMix64 of (seed, step), kept positive for manual_seed.
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (step as u64).wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// `step-00001000`.
pub fn dir_name(step: i64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint for `state.step` under `<run>/checkpoints/`, points `latest` at it and keeps
/// only the newest `keep_last` checkpoints (0 = keep all). Returns the checkpoint's directory.
pub fn save(run_dir: &Path, state: &TrainState, weights: &[(String, Tensor)], optimizer: &[(String, Tensor)], keep_last: usize) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root).with_cause(|| format!("cannot create {}", root.display()))?;
    let name = dir_name(state.step);
    let final_dir = root.join(&name);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_cause(|| format!("cannot create {}", tmp.display()))?;
    let write = || -> Result<()> {
        write_tensors(&tmp.join("model.safetensors"), weights)?;
        write_tensors(&tmp.join("optimizer.safetensors"), optimizer)?;
        write_atomic(&tmp.join("state.json"), (serde_json::to_string_pretty(state)? + "\n").as_bytes())?;
        fsync(&tmp)?;
        if final_dir.exists() {
            // Re-reaching a step after resuming from an earlier checkpoint: replace the old one.
            let old = root.join(format!(".old-{name}-{}", std::process::id()));
            std::fs::rename(&final_dir, &old)?;
            std::fs::rename(&tmp, &final_dir)?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &final_dir)?;
        }
        fsync(&root)?;
        write_atomic(&root.join("latest"), format!("{name}\n").as_bytes())?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_cause(|| format!("cannot write checkpoint {}", final_dir.display()));
    }
    prune(&root, keep_last, &name)?;
    Ok(final_dir)
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    // safetensors wants contiguous CPU tensors; copying to the host also frees GPU memory early.
    let host: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&host, path).with_cause(|| format!("cannot write {}", path.display()))?;
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}

fn fsync(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The completed checkpoints under `<run>/checkpoints`, oldest first, as (step, directory).
pub fn list(run_dir: &Path) -> Result<Vec<(i64, PathBuf)>> {
    let root = run_dir.join("checkpoints");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&root) else { return Ok(out) };
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<i64>().ok()) {
            out.push((step, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn prune(root: &Path, keep_last: usize, latest: &str) -> Result<()> {
    // Leftovers of a save killed half-way.
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(".tmp-") || name.starts_with(".old-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if keep_last == 0 {
        return Ok(());
    }
    let all = list(root.parent().unwrap_or(root))?;
    let n = all.len();
    for (_, dir) in all.into_iter().take(n.saturating_sub(keep_last)) {
        if dir.file_name().is_some_and(|f| f != latest) {
            std::fs::remove_dir_all(&dir).with_cause(|| format!("cannot remove old checkpoint {}", dir.display()))?;
        }
    }
    Ok(())
}

/// A checkpoint directory from a run directory (its `latest`) or a checkpoint directory itself.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("state.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("checkpoints").join("latest");
    if latest.is_file() {
        let name = std::fs::read_to_string(&latest).with_cause(|| format!("cannot read {}", latest.display()))?;
        let dir = path.join("checkpoints").join(name.trim());
        ensure!(dir.join("state.json").is_file(), "{} names {} but it is not a complete checkpoint; pass an older checkpoint directory from {}",
            latest.display(), dir.display(), path.join("checkpoints").display());
        return Ok(dir);
    }
    if !path.exists() {
        bail!("{} does not exist; pass a run directory (runs/<experiment>/<time>) or one of its checkpoints/step-* directories", path.display());
    }
    bail!("{} has no checkpoint (no state.json, no checkpoints/latest); runs write one every ckpt_every steps and at the end", path.display())
}

/// A checkpoint read from disk (tensors on the CPU).
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
}

impl Checkpoint {
    /// Reads `state.json` of the checkpoint `resolve(path)` finds; tensors are read on demand.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = resolve(path)?;
        let p = dir.join("state.json");
        let text = std::fs::read_to_string(&p).with_cause(|| format!("cannot read {}", p.display()))?;
        let state: TrainState = serde_json::from_str(&text).with_cause(|| format!("{} is not a checkpoint state", p.display()))?;
        Ok(Self { dir, state })
    }

    /// A resume must run as many processes as the run that wrote the checkpoint (each rank's data
    /// position is counted in its own micro-batches).
    pub fn check_world_size(&self, world_size: usize) -> Result<()> {
        anyhow::ensure!(
            self.state.world_size == world_size,
            "{} was written by a run of {} process(es); resume it with the same number (bash setup.sh launch --nproc {}), not {world_size}",
            self.dir.display(), self.state.world_size, self.state.world_size
        );
        Ok(())
    }

    /// The run directory this checkpoint belongs to (`<run>/checkpoints/step-N` -> `<run>`).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_else(|| self.dir.clone())
    }

    /// The saved config section (`"model"` or `"train"`) as the notebook's struct.
    pub fn config<T: serde::de::DeserializeOwned>(&self, section: &str) -> Result<T> {
        let v = self.state.config.get(section).with_context(|| format!("checkpoint {} has no {section} config", self.dir.display()))?;
        serde_json::from_value(v.clone()).with_cause(|| format!("the {section} config of checkpoint {} does not fit this notebook's config struct", self.dir.display()))
    }

    fn tensors(&self, file: &str) -> Result<HashMap<String, Tensor>> {
        let p = self.dir.join(file);
        let list = Tensor::read_safetensors(&p).with_cause(|| format!("cannot read {} (damaged checkpoint? resume from an older one)", p.display()))?;
        Ok(list.into_iter().collect())
    }

    /// Optimizer state tensors by name (for [`crate::optim::Optimizer::load_state`]).
    pub fn optimizer_state(&self) -> Result<HashMap<String, Tensor>> {
        self.tensors("optimizer.safetensors")
    }

    /// Copies the saved weights into `vars` (the VarStore's variables, trainable or not), matching
    /// every name and shape, converting dtype. A missing, extra or reshaped tensor is an error
    /// naming it. Placed experts' shards are cut from the saved whole stacks
    /// ([`crate::placement::lookup`]), so a run resumes under another placement.
    pub fn load_weights(&self, vars: &HashMap<String, Tensor>) -> Result<usize> {
        let saved = self.tensors("model.safetensors")?;
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for name in &names {
            let Some(src) = crate::placement::lookup(&saved, name) else {
                bail!("checkpoint {} has no tensor {name}; it was written for a different model", self.dir.display())
            };
            let dst = &vars[*name];
            ensure!(src.size() == dst.size(), "checkpoint tensor {name} has shape {:?} but the model's has {:?}", src.size(), dst.size());
            tch::no_grad(|| dst.shallow_clone().copy_(&src));
        }
        let used: std::collections::HashSet<String> = crate::placement::sources(names.iter().map(|n| n.as_str())).into_iter().collect();
        let mut extra: Vec<_> = saved.into_keys().filter(|k| !used.contains(k)).collect();
        extra.sort();
        ensure!(extra.is_empty(), "checkpoint {} has tensors this model does not have: {}", self.dir.display(), extra.join(", "));
        Ok(names.len())
    }

    /// Errors, naming every differing field, unless `current` equals the checkpoint's config in
    /// every field except those listed in `may_change` (as `section.field`, e.g. `train.max_steps`).
    pub fn check_config(&self, current: &serde_json::Value, may_change: &[&str]) -> Result<()> {
        let diffs = config_diff(&self.state.config, current);
        let bad: Vec<String> = diffs.into_iter().filter(|(k, _, _)| !may_change.contains(&k.as_str())).map(|(k, a, b)| format!("{k}: checkpoint {a}, now {b}")).collect();
        ensure!(bad.is_empty(), "checkpoint {} does not match the current config ({}); resume with the checkpoint's config or start a new run",
            self.dir.display(), bad.join("; "));
        Ok(())
    }
}

/// (`section.field`, old, new) for every field that differs between two `{section: {field: v}}` maps.
pub fn config_diff(old: &serde_json::Value, new: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let empty = serde_json::Map::new();
    let sections: std::collections::BTreeSet<&String> = old.as_object().unwrap_or(&empty).keys().chain(new.as_object().unwrap_or(&empty).keys()).collect();
    for s in sections {
        let (a, b) = (old.get(s.as_str()).and_then(|v| v.as_object()).unwrap_or(&empty), new.get(s.as_str()).and_then(|v| v.as_object()).unwrap_or(&empty));
        let fields: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for f in fields {
            let (x, y) = (a.get(f.as_str()), b.get(f.as_str()));
            if x != y {
                let show = |v: Option<&serde_json::Value>| v.map_or("(absent)".to_string(), |v| v.to_string());
                out.push((format!("{s}.{f}"), show(x), show(y)));
            }
        }
    }
    out
}
