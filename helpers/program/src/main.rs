//! `moe-program`: an experiment notebook as a Rust program (see the crate docs in lib.rs).
//! Called by `bash setup.sh build` / `run --program` / `gpu-check --prepare`, which set up the
//! libtorch environment first.
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Turn an experiment notebook into a Rust program and build it")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate the program's package and build it (reusing setup's build of the dependencies;
    /// the notebook's code at opt-level 3); prints the binary's path last.
    Build {
        notebook: PathBuf,
        /// The libtorch the program links (the torch version of the Python environment in use).
        #[arg(long)]
        torch: String,
        /// Leave out code cells with this tag (repeatable); cells tagged `no-program` always are.
        #[arg(long = "skip-tag")]
        skip_tags: Vec<String>,
        /// Only write the package, do not run cargo.
        #[arg(long)]
        no_build: bool,
    },
    /// Print the program's main.rs (what `build` compiles) to stdout.
    Generate {
        notebook: PathBuf,
        #[arg(long = "skip-tag")]
        skip_tags: Vec<String>,
    },
}

fn project_root() -> Result<PathBuf> {
    let cwd = std::env::current_dir()?;
    cwd.ancestors()
        .find(|d| d.join("helpers").is_dir() && d.join("experiments").is_dir())
        .map(|p| p.to_path_buf())
        .with_context(|| format!("{} is not inside the project (no ancestor has helpers/ and experiments/)", cwd.display()))
}

fn main() {
    // One line per error, cause included (anyhow's default puts the cause on later lines).
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate { notebook, skip_tags } => print!("{}", moe_program::generate(&notebook, &skip_tags)?.main_rs),
        Cmd::Build { notebook, torch, skip_tags, no_build } => {
            let root = project_root()?;
            let p = moe_program::prepare(&root, &notebook, &torch, &skip_tags)?;
            eprintln!(
                "[program] {} from {} ({} code cells; {}), torch {torch}: {}",
                p.name,
                notebook.display(),
                p.program.cells.len(),
                moe_program::describe_deps(&p.program.deps, moe_program::tch_for_torch(&torch)?),
                p.package_dir.display()
            );
            if !no_build {
                let t0 = std::time::Instant::now();
                let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    .args(["build", "--manifest-path"])
                    .arg(p.package_dir.join("Cargo.toml"))
                    .env("CARGO_TARGET_DIR", &p.target_dir)
                    .status()
                    .context("cannot run cargo")?;
                anyhow::ensure!(
                    status.success(),
                    "cargo build of {} failed (errors above; the generated source is {})",
                    p.name,
                    p.package_dir.join("main.rs").display()
                );
                moe_program::install(&p)?;
                eprintln!("[program] built {} in {:.0}s", p.binary.display(), t0.elapsed().as_secs_f64());
            }
            println!("{}", p.binary.display());
        }
    }
    Ok(())
}
