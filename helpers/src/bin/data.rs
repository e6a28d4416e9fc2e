//! `bash setup.sh data <command>`: pretraining data for long jobs on a pod, the same steps as the
//! notebooks `data/download.ipynb` and `data/process.ipynb`.
//!
//! ```text
//! bash setup.sh data download --max-files 2                     # FineWeb-Edu sample/10BT, 2 of 14 files
//! bash setup.sh data process --input ~/.cache/huggingface/hub/datasets--HuggingFaceFW--fineweb-edu \
//!      --out data/shards/fineweb-edu --min-score 3
//! bash setup.sh data info data/shards/fineweb-edu
//! ```
use anyhow::Result;
use clap::{Parser, Subcommand};
use helpers::prepare;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "data", about = "Download and tokenize pretraining data into token shards")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download a hub dataset's files into the hub cache ($HF_HOME/hub); resumes interrupted
    /// downloads, skips cached files; HF_HUB_OFFLINE=1 uses only the cache. Prints the local paths.
    Download {
        /// Dataset id, optionally @revision.
        #[arg(long, default_value = prepare::FINEWEB_EDU)]
        dataset: String,
        /// Which files (`*` within a path segment, `**` across).
        #[arg(long, default_value = prepare::FINEWEB_EDU_10BT)]
        files: String,
        /// At most this many files (in name order).
        #[arg(long)]
        max_files: Option<usize>,
    },
    /// Tokenize parquet / JSONL files into token shards (one per input file; finished shards
    /// are skipped on a rerun, half-written ones redone).
    Process {
        /// Input files or directories (searched recursively for .parquet / .jsonl); repeatable.
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        /// Output directory (train/, val/, manifest.json).
        #[arg(long)]
        out: PathBuf,
        /// `olmoe` (bundled), a tokenizer.json path, or a hub model id.
        #[arg(long, default_value = "olmoe")]
        tokenizer: String,
        /// The text column (parquet) or field (JSONL).
        #[arg(long, default_value = "text")]
        text_column: String,
        /// Keep documents whose `language` column equals this.
        #[arg(long)]
        language: Option<String>,
        /// Keep documents whose `score` column (FineWeb-Edu's educational score) is at least this.
        #[arg(long)]
        min_score: Option<f64>,
        /// Validation tokens held out from the first documents of the first input.
        #[arg(long, default_value_t = 1 << 20)]
        val_tokens: u64,
        /// Documents per tokenizer call.
        #[arg(long, default_value_t = 1024)]
        batch_docs: usize,
    },
    /// Shards, tokens and documents of a processed directory.
    Info { dir: PathBuf },
    /// Tokenization throughput of this build on `input` (what benchmarks/tokenize.py compares
    /// with the Python binding); prints one JSON line.
    BenchTokenize {
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value = "olmoe")]
        tokenizer: String,
        #[arg(long, default_value = "text")]
        text_column: String,
        #[arg(long, default_value_t = 1024)]
        batch_docs: usize,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("data: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Download { dataset, files, max_files } => {
            for p in prepare::download(&dataset, &files, max_files)? {
                println!("{}", p.display());
            }
        }
        Cmd::Process { input, out, tokenizer, text_column, language, min_score, val_tokens, batch_docs } => {
            let mut job = prepare::Process::new(input, out, prepare::tokenizer_file(&tokenizer)?);
            job.text_column = text_column;
            job.filter = prepare::Filter { language, min_score };
            job.val_tokens = val_tokens;
            job.batch_docs = batch_docs;
            println!("{}", job.run()?);
        }
        Cmd::Info { dir } => {
            for sub in ["val", "train"] {
                let shards = helpers::shards::open_dir(&dir.join(sub), None)?;
                let (tokens, docs): (u64, u64) = shards.iter().fold((0, 0), |(t, d), s| (t + s.n_tokens, d + s.n_docs));
                println!("{sub}: {} shard(s), {tokens} tokens, {docs} documents", shards.len());
                for s in &shards {
                    println!("  {}  {} tokens  {} docs  u{}  tokenizer {:016x}", s.path.display(), s.n_tokens, s.n_docs, s.dtype * 8, s.tokenizer);
                }
            }
        }
        Cmd::BenchTokenize { input, tokenizer, text_column, batch_docs } => {
            let tok = helpers::Tokenizer::from_file(prepare::tokenizer_file(&tokenizer)?)?;
            let mut docs = prepare::Documents::open(&input, &text_column, &prepare::Filter::default())?;
            let mut texts = Vec::new();
            while let Some(b) = docs.next_batch()? {
                texts.extend(b);
            }
            let bytes: usize = texts.iter().map(String::len).sum();
            let encode_all = || -> Result<usize> {
                let mut tokens = 0;
                for chunk in texts.chunks(batch_docs.max(1)) {
                    let encs = tok
                        .inner
                        .encode_batch_fast(chunk.iter().map(String::as_str).collect::<Vec<_>>(), false)
                        .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
                    tokens += encs.iter().map(|e| e.len()).sum::<usize>();
                }
                Ok(tokens)
            };
            // One untimed pass first: the thread pool and the BPE word cache warm up, as they are
            // in a long processing job (and in the Python reference after its first repeat).
            encode_all()?;
            let t0 = Instant::now();
            let tokens = encode_all()?;
            let secs = t0.elapsed().as_secs_f64();
            let threads = rayon::current_num_threads();
            println!(
                "{}",
                serde_json::json!({"impl": "rust tokenizers (encode_batch_fast)", "docs": texts.len(), "bytes": bytes, "tokens": tokens,
                    "seconds": secs, "tokens_per_s": tokens as f64 / secs, "mb_per_s": bytes as f64 / 1e6 / secs, "threads": threads})
            );
        }
    }
    Ok(())
}
