//! `helpers`: the thin crate the experiment notebooks call for everything that is not the model
//! or the training loop. The model and the loop live in the notebooks, where researchers edit them.
//!
//! One module per concern, each small enough to read in one sitting:
//! - [`runtime`]: load libtorch (and its CUDA library), choose the device and the thread count.
//! - [`data`]: the tokenizer (OLMoE's by default) and the bundled data's paths.
//! - [`prepare`]: pretraining data from nothing to shards: hub dataset downloads (resumable,
//!   offline mode), parquet / JSONL text with filters, parallel tokenization into shards.
//! - [`progress`]: progress bars in a terminal, periodic lines in notebooks and logs.
//! - [`shards`]: binary token shards (header, document boundaries), memory-mapped, and a loader
//!   whose order depends only on (seed, position), split across ranks, with a prefetch thread.
//! - [`run`]: run directories (config, metrics JSONL, weights), atomic writes, timestamps.
//! - [`config`]: overrides of config fields from environment variables, for headless runs.
//! - [`hf`]: Hugging Face OLMoE checkpoints: `config.json` into the notebook's config, safetensors
//!   (single or sharded, per-expert or merged experts) into the notebook's VarStore.
//! - [`optim`]: AdamW and Muon over tensors (state that can be saved), fp32 master weights for
//!   mixed precision, gradient clipping, learning-rate schedules.
//! - [`checkpoint`]: atomic checkpoints with a `latest` pointer, keep-last-N, exact resume.
//! - [`generate`]: greedy / temperature / top-k / top-p choice of the next token.
//! - [`interp`]: per-token routing tables, exported as parquet / CSV; routing metrics (usage entropy,
//!   balance violation, path consistency, stay length, router similarity) and heatmaps.
//! - [`dist`]: past one process on PyTorch's c10d (Gloo): joining a torchrun launch, all-reduce,
//!   broadcast, barrier, all-to-all with autograd, sub-groups, data-parallel gradient averaging.
//! - [`placement`]: expert-to-device maps (contiguous, round-robin, by free memory), validated.
//! - [`plot`]: `training_curves.png`, shown inline in the notebook.
//! - [`sweep`]: grids over config fields run headlessly, collected into a table and loss plots.
//! - [`memory`]: resident memory and its peak (what activation checkpointing saves on CPU).
//! - [`perf`]: FLOPs per token and a GEMM peak measured in-process, for MFU.
//! - [`stop`]: ending training after the current step with a checkpoint, on SIGTERM (preemption)
//!   or the W&B Stop button, the same step on every rank.
//! - [`wandb`]: a Weights & Biases client on reqwest: background uploads from an on-disk spool,
//!   retries, offline mode and `sync`, resume, files. The key never leaves memory and the W&B host.
//!
//! Every function that can fail on user input returns `anyhow::Result` with a message that says
//! what to do: a panic in a notebook cell can cost the user every variable they had.
//!
//! Environment variables read here (all optional):
//! `MOE_DEVICE` (auto|cpu|cuda|cuda:N), `MOE_THREADS`, `MOE_RUN_DIR`; `WANDB_*` (see [`wandb`]).
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dist;
pub mod generate;
pub mod hf;
pub mod interp;
pub mod memory;
pub mod optim;
pub mod perf;
pub mod placement;
pub mod plot;
pub mod prepare;
pub mod progress;
pub mod run;
pub mod runtime;
pub mod shards;
pub mod stop;
pub mod sweep;
pub mod wandb;

pub use config::{env_parse, Overrides};
pub use data::Tokenizer;
pub use run::{project_root, rel, MetricsLog, RunDir};
pub use runtime::Runtime;

/// Like anyhow's `with_context`, but the cause goes into the one message. evcxr prints an error a
/// cell returns with `{}`, which shows only the outermost context: "cannot read x" without "No such
/// file or directory" would leave the user guessing.
pub(crate) trait WithCause<T> {
    fn with_cause<F: FnOnce() -> String>(self, f: F) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> WithCause<T> for std::result::Result<T, E> {
    fn with_cause<F: FnOnce() -> String>(self, f: F) -> anyhow::Result<T> {
        self.map_err(|e| {
            let e: anyhow::Error = e.into();
            anyhow::anyhow!("{}: {e:#}", f())
        })
    }
}
