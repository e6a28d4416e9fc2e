//! `bash setup.sh sweep`: a grid over config fields, one headless notebook run per point, then a
//! table and plots of all of them (helpers::sweep has the grid, the collection and the plots).
//!
//! ```text
//! bash setup.sh sweep --preset cpu --steps 200 --grid model.num_hidden_layers=2,4 --grid model.num_experts=4,8
//! bash setup.sh sweep --out runs/sweeps/<group>                # continue it (finished runs are skipped)
//! bash setup.sh sweep --out runs/sweeps/<group> --report-only  # just the table and plots
//! ```
//!
//! Each point runs `helpers/scripts/run_notebook.py <notebook>` (with `--program`: `bash setup.sh
//! run --program <notebook>`, the notebook compiled once, every point starting in seconds) with
//! MOE_RUN_DIR=<out>/<run name>, MOE_SET=<--set> <point>, WANDB_RUN_GROUP=<group> and
//! WANDB_NAME=<group>/<run name>; the rest of the environment is inherited. Output goes to the
//! terminal and to <run dir>/log.txt.
use anyhow::{bail, Context, Result};
use clap::Parser;
use helpers::run::{fmt_duration, utc_timestamp};
use helpers::sweep::{self, Point, Status, Sweep};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Parser)]
#[command(name = "sweep", about = "Run a notebook over a grid of config values and collect the results")]
struct Cli {
    /// A swept field and its values, `section.field=v1,v2` (sections: model, train; values JSON or
    /// bare words); repeatable, every combination runs. Left out: the grid of --out's sweep.json.
    #[arg(long)]
    grid: Vec<String>,
    /// The notebook each point runs.
    #[arg(long)]
    notebook: Option<PathBuf>,
    /// MOE_PRESET of every run (default: the notebook's).
    #[arg(long)]
    preset: Option<String>,
    /// MOE_STEPS of every run (default: the preset's).
    #[arg(long)]
    steps: Option<i64>,
    /// Overrides every run gets, as MOE_SET: "train.lr=1e-3 train.eval_every=50".
    #[arg(long)]
    set: Option<String>,
    /// W&B group of the runs (default: sweep-<UTC time>, or the one in --out's sweep.json).
    #[arg(long)]
    group: Option<String>,
    /// The sweep directory (default: runs/sweeps/<group>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only collect the runs already in --out into the table and plots.
    #[arg(long)]
    report_only: bool,
    /// Run each point as the notebook's compiled program (`bash setup.sh run --program`) instead of
    /// in the Jupyter kernel: the same cells, built once, so a point does not spend minutes
    /// compiling cells. May differ between the calls that continue one sweep.
    #[arg(long)]
    program: bool,
}

const DEFAULT_NOTEBOOK: &str = "experiments/base-olmoe/experiment.ipynb";

fn main() {
    match run(Cli::parse()) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("sweep: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Ok(false) when a run failed or is missing.
fn run(cli: Cli) -> Result<bool> {
    let root = helpers::project_root()?;
    let absolute = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(p) };
    let out = match (&cli.out, &cli.group) {
        (Some(o), _) => absolute(o),
        (None, Some(g)) => root.join("runs/sweeps").join(g),
        (None, None) if cli.report_only => bail!("--report-only needs --out DIR (or --group NAME for runs/sweeps/NAME)"),
        (None, None) => root.join("runs/sweeps").join(format!("sweep-{}", utc_timestamp())),
    };
    if cli.report_only {
        return report(&out, false);
    }
    let recorded = if out.join("sweep.json").is_file() { Some(Sweep::load(&out)?) } else { None };
    let sweep = settings(&cli, &root, &out, recorded.as_ref())?;
    sweep.save(&out)?;

    let python = root.join(".venv/bin/python");
    anyhow::ensure!(python.is_file(), "{} does not exist; run `bash setup.sh` first", python.display());
    let points = sweep.points();
    let how = if cli.program { " as a program" } else { "" };
    println!("sweep {}: {} run(s) of {}{how} into {}", sweep.group, points.len(), sweep.notebook, out.display());
    let t0 = Instant::now();
    for (i, point) in points.iter().enumerate() {
        let name = point.name();
        let n = format!("[{}/{}] {name}", i + 1, points.len());
        let dir = out.join(&name);
        let row = sweep::collect_run(&dir, point);
        if row.status == Status::Ok {
            println!("{n}: skipped, already done (val loss {})", fmt_loss(row.val_loss));
            continue;
        }
        let resume = prepare_retry(&dir)?;
        println!(
            "{n}: running{} (MOE_SET=\"{}\", log {})",
            if resume { ", resuming from its latest checkpoint" } else { "" },
            sweep.moe_set(point),
            dir.join("log.txt").display()
        );
        let t = Instant::now();
        let code = run_point(&root, &python, &sweep, point, &dir, resume, cli.program)?;
        let secs = t.elapsed().as_secs_f64();
        let record = serde_json::json!({ "exit_code": code, "seconds": secs, "moe_set": sweep.moe_set(point), "resumed": resume, "finished": utc_timestamp() });
        helpers::RunDir::at(&dir)?.write_json(sweep::RUN_RECORD, &record)?;
        let row = sweep::collect_run(&dir, point);
        println!(
            "{n}: {} in {} (exit {code}), val loss {}; sweep {}",
            row.status,
            fmt_duration(secs),
            fmt_loss(row.val_loss),
            fmt_duration(t0.elapsed().as_secs_f64())
        );
    }
    report(&out, true)
}

/// The sweep's settings from the command line; for a directory that already holds a sweep, the
/// options left out come from its sweep.json and those given must agree with it (otherwise the
/// finished runs that are skipped would not be comparable with the new ones). The grid may change:
/// points whose run already finished are reused, by name.
fn settings(cli: &Cli, root: &Path, out: &Path, recorded: Option<&Sweep>) -> Result<Sweep> {
    let notebook = match &cli.notebook {
        Some(nb) => {
            let p = std::fs::canonicalize(nb).with_context(|| format!("notebook {} does not exist", nb.display()))?;
            p.strip_prefix(root).map(Path::to_path_buf).unwrap_or(p).to_string_lossy().into_owned()
        }
        None => recorded.map(|s| s.notebook.clone()).unwrap_or_else(|| DEFAULT_NOTEBOOK.into()),
    };
    let grid = match (cli.grid.is_empty(), recorded) {
        (false, _) => sweep::parse_grid(&cli.grid)?,
        (true, Some(r)) => r.grid.clone(),
        (true, None) => bail!("no --grid given and {} holds no sweep.json to continue; e.g. --grid model.num_hidden_layers=2,4", out.display()),
    };
    let group = cli
        .group
        .clone()
        .or_else(|| recorded.map(|s| s.group.clone()))
        .unwrap_or_else(|| out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| format!("sweep-{}", utc_timestamp())));
    let sweep = Sweep {
        group,
        notebook,
        preset: cli.preset.clone().or_else(|| recorded.and_then(|s| s.preset.clone())),
        steps: cli.steps.or_else(|| recorded.and_then(|s| s.steps)),
        set: cli.set.clone().or_else(|| recorded.map(|s| s.set.clone())).unwrap_or_default(),
        grid,
    };
    sweep::check_set(&sweep.set, &sweep.grid)?;
    anyhow::ensure!(root.join(&sweep.notebook).is_file(), "notebook {} does not exist", sweep.notebook);
    if let Some(r) = recorded {
        let differs = [
            ("--group", r.group != sweep.group),
            ("--notebook", r.notebook != sweep.notebook),
            ("--preset", r.preset != sweep.preset),
            ("--steps", r.steps != sweep.steps),
            ("--set", r.set != sweep.set),
        ];
        let bad: Vec<&str> = differs.iter().filter(|d| d.1).map(|d| d.0).collect();
        if !bad.is_empty() {
            bail!(
                "{} was started with different {}: see its sweep.json; leave those options out to continue it, or pass a new --out",
                out.display(),
                bad.join(", ")
            );
        }
    }
    Ok(sweep)
}

/// A point whose run did not finish is run again. With a checkpoint it resumes from it (exact
/// resume, the same W&B run); without one, the old attempt moves aside to `<name>.failed-<time>`
/// so the new run starts from an empty directory (metrics.jsonl is appended to, not replaced).
fn prepare_retry(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    if dir.join("checkpoints/latest").is_file() {
        return Ok(true);
    }
    if std::fs::remove_dir(dir).is_ok() {
        return Ok(false); // it was empty
    }
    let aside = dir.with_file_name(format!("{}.failed-{}", dir.file_name().unwrap_or_default().to_string_lossy(), utc_timestamp()));
    std::fs::rename(dir, &aside).with_context(|| format!("cannot move {} aside", dir.display()))?;
    println!("  the unfinished attempt without a checkpoint moved to {}", aside.display());
    Ok(false)
}

/// Runs the notebook (or its program) for `point`, its stdout and stderr going both to ours and to
/// `<dir>/log.txt`; returns its exit code.
fn run_point(root: &Path, python: &Path, sweep: &Sweep, point: &Point, dir: &Path, resume: bool, program: bool) -> Result<i32> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("log.txt")).context("cannot open log.txt")?;
    let log = Arc::new(Mutex::new(log));
    let mut cmd = if program {
        let mut c = Command::new("bash");
        c.arg(root.join("setup.sh")).args(["run", "--program"]);
        c
    } else {
        let mut c = Command::new(python);
        c.arg(root.join("helpers/scripts/run_notebook.py"));
        c
    };
    cmd.arg(root.join(&sweep.notebook)).current_dir(root);
    cmd.env("MOE_RUN_DIR", dir).env("MOE_SET", sweep.moe_set(point)).env_remove("MOE_RESUME");
    cmd.env("WANDB_RUN_GROUP", &sweep.group).env("WANDB_NAME", format!("{}/{}", sweep.group, point.name()));
    if let Some(p) = &sweep.preset {
        cmd.env("MOE_PRESET", p);
    }
    if let Some(s) = sweep.steps {
        cmd.env("MOE_STEPS", s.to_string());
    }
    if resume {
        cmd.env("MOE_RESUME", dir);
    }
    let what = if program { "cannot start `bash setup.sh run --program`" } else { "cannot start the notebook runner" };
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context(what)?;
    // Rust note: one thread per pipe, so neither fills up while the other is read.
    let tee = |mut from: Box<dyn Read + Send>, to_stderr: bool| {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                let _ = log.lock().map(|mut f| f.write_all(&buf[..n]));
                let _ = if to_stderr { std::io::stderr().write_all(&buf[..n]) } else { std::io::stdout().write_all(&buf[..n]) };
            }
        })
    };
    let threads = [tee(Box::new(child.stdout.take().unwrap()), false), tee(Box::new(child.stderr.take().unwrap()), true)];
    let status = child.wait().context("waiting for the notebook runner")?;
    for t in threads {
        let _ = t.join();
    }
    Ok(status.code().unwrap_or(-1))
}

/// Collects, writes the table and plots, prints the table and where they are. Ok(false) when
/// `strict` and some run failed or is missing.
fn report(out: &Path, strict: bool) -> Result<bool> {
    let r = sweep::report(out)?;
    println!("\n{}", r.table);
    for f in &r.files {
        println!("wrote {}", f.display());
    }
    let bad: Vec<String> = r.rows.iter().filter(|r| r.status != Status::Ok).map(|r| format!("{} ({})", r.name, r.status)).collect();
    if !bad.is_empty() {
        println!(
            "{} of {} run(s) did not finish: {}; see their log.txt. Run the same command again to retry them.",
            bad.len(),
            r.rows.len(),
            bad.join(", ")
        );
    }
    Ok(!strict || bad.is_empty())
}

fn fmt_loss(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
}
