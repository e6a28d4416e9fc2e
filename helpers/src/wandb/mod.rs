//! Weights & Biases logging over W&B's HTTP protocol (docs/wandb.md), with no Python.
//!
//! ```text
//! let settings = helpers::wandb::Settings::from_env(&root, "moe-research")?;  // secrets.env, env, ~/.netrc
//! let mut wandb = helpers::wandb::start(&run.path, settings, &config, None)?;    // prints the run URL
//! wandb.log(helpers::wandb::Row::from_json(&row))?;                            // never blocks on the network
//! wandb.save_file(&run.file("training_curves.png"))?;
//! wandb.finish(0)?;                                                             // flushes, bounded in time
//! ```
//!
//! Every record first goes to `<run>/wandb/spool.jsonl` (the durable queue); a background thread
//! sends it in batches, retrying transient failures with exponential backoff and `Retry-After`.
//! During an outage rows pile up in the spool and go out in order, once each, when the server is
//! back. `WANDB_MODE=offline` only spools; `sync` (or `bash setup.sh wandb-sync <run dir>`) uploads
//! the spool later with the same code. `disabled` (the default without a key) does nothing.
//! The API key lives only in memory and in the `Authorization` header sent to the W&B host.
mod api;
pub mod metadata;
mod spool;
pub mod system;
mod uploader;

pub use api::{ApiKey, Failure};
pub use spool::{Metric, Record, Row, RunInfo};

use crate::WithCause;
use anyhow::{bail, Result};
use spool::SpoolWriter;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uploader::Uploader;

/// The name a metric gets on the W&B run page. W&B groups panels by the part before the first
/// `/`, so the notebook's flat names (`metrics.jsonl` keeps them) become sections: `train.loss` ->
/// `train/loss`, `val.accuracy` -> `val/accuracy`, `lr` -> `train/lr`, `grad_norm.experts` ->
/// `train/grad_norm.experts`, `tokens_per_s` -> `perf/tokens_per_s`, `mfu.datasheet` ->
/// `perf/mfu.datasheet`, `memory.peak_rss_gib` -> `perf/memory.peak_rss_gib`,
/// `interp.stay_mean` -> `interp/stay_mean`. Any other dotted name splits at its first dot; a
/// plain name, `step` and W&B's own `_step`/`_runtime` keep theirs.
pub fn panel_name(key: &str) -> String {
    const TRAIN: &[&str] = &["lr", "aux_coef", "tokens", "grad_norm", "skipped", "skipped_steps", "nonfinite"];
    const PERF: &[&str] = &["tokens_per_s", "mfu", "batch_time", "data_time", "fwd_time", "bwd_time", "comm_time", "memory"];
    if key == "step" || key.starts_with('_') || key.contains('/') {
        return key.to_string();
    }
    let head = key.split('.').next().unwrap_or(key);
    if TRAIN.contains(&head) {
        format!("train/{key}")
    } else if PERF.contains(&head) {
        format!("perf/{key}")
    } else if let Some((head, rest)) = key.split_once('.') {
        format!("{head}/{rest}")
    } else {
        key.to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Online,
    Offline,
    Disabled,
}

/// Where and how to log. `from_env` fills it; tests set the timings directly.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub key: Option<ApiKey>,
    pub base_url: String,
    pub app_url: String,
    pub entity: Option<String>,
    pub project: String,
    pub name: Option<String>,
    pub notes: Option<String>,
    pub tags: Vec<String>,
    pub group: Option<String>,
    pub job_type: Option<String>,
    /// `WANDB_RUN_ID`: the id of a new run (a resumed training run uses its checkpoint's id).
    pub run_id: Option<String>,
    /// Seconds between batches (W&B's client: 5-15).
    pub batch_interval: Duration,
    /// An empty request after this long without traffic.
    pub heartbeat: Duration,
    /// Backoff: first retry after `retry_base`, doubling to `retry_max`, plus up to 25% jitter.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How long `finish` waits for the last rows to go out.
    pub finish_timeout: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// System metrics (`system`) every this long, by the live client; None: off
    /// (`WANDB_X_STATS_SAMPLING_INTERVAL` seconds, 0 = off; default 15).
    pub system_every: Option<Duration>,
}

/// `KEY=VALUE` lines of a `secrets.env` (comments, blank lines, `export ` and quotes allowed).
pub fn read_env_file(path: &Path) -> BTreeMap<String, String> {
    let Ok(text) = std::fs::read_to_string(path) else { return BTreeMap::new() };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("export ").unwrap_or(l).split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches(|c| c == '"' || c == '\'').to_string()))
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

/// The password of the `~/.netrc` entry for `host` (what `wandb login` writes).
pub fn netrc_password(netrc: &Path, host: &str) -> Option<String> {
    let text = std::fs::read_to_string(netrc).ok()?;
    let tokens: Vec<&str> = text.split_whitespace().collect();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == "machine" && tokens.get(i + 1) == Some(&host) {
            let mut j = i + 2;
            while j + 1 < tokens.len() && tokens[j] != "machine" {
                if tokens[j] == "password" {
                    return Some(tokens[j + 1].to_string());
                }
                j += 2;
            }
        }
        i += 1;
    }
    None
}

impl Settings {
    /// Reads the environment, then `<root>/secrets.env` (or the file `MOE_SECRETS` names), then
    /// `~/.netrc` (for the key only). `default_project` is used when `WANDB_PROJECT` is unset.
    pub fn from_env(root: &Path, default_project: &str) -> Result<Self> {
        let secrets = std::env::var_os("MOE_SECRETS").map(PathBuf::from).unwrap_or_else(|| root.join("secrets.env"));
        let file = read_env_file(&secrets);
        // A variable set in the environment wins over the file: a sweep's WANDB_NAME or a one-off
        // WANDB_MODE=offline must not be overridden by what secrets.env holds.
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty()).or_else(|| file.get(k).cloned());
        let base_url = get("WANDB_BASE_URL").unwrap_or_else(|| "https://api.wandb.ai".into()).trim_end_matches('/').to_string();
        let host = base_url.split("://").nth(1).unwrap_or(&base_url).split(['/', ':']).next().unwrap_or("").to_string();
        let home = std::env::var("HOME").unwrap_or_default();
        let key = get("WANDB_API_KEY").or_else(|| netrc_password(&Path::new(&home).join(".netrc"), &host)).map(|k| ApiKey::new(&k));
        let mode = match get("WANDB_MODE").as_deref() {
            None => if key.is_some() { Mode::Online } else { Mode::Disabled },
            Some("online" | "run") => Mode::Online,
            Some("offline" | "dryrun") => Mode::Offline,
            Some("disabled") => Mode::Disabled,
            Some(other) => bail!("WANDB_MODE={other:?}: use online, offline or disabled"),
        };
        // In a launch of several processes only rank 0 logs (one W&B run per training run).
        let mode = if crate::run::launch_rank() > 0 { Mode::Disabled } else { mode };
        if mode == Mode::Online && key.is_none() {
            bail!("WANDB_MODE=online but no API key: put WANDB_API_KEY in secrets.env (see secrets.env.example), the environment or ~/.netrc");
        }
        let app_url = get("WANDB_APP_URL").unwrap_or_else(|| base_url.replacen("://api.", "://", 1));
        Ok(Self {
            mode, key, base_url, app_url,
            entity: get("WANDB_ENTITY"),
            project: get("WANDB_PROJECT").unwrap_or_else(|| default_project.to_string()),
            name: get("WANDB_NAME"),
            notes: get("WANDB_NOTES"),
            tags: get("WANDB_TAGS").map(|t| t.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()).unwrap_or_default(),
            group: get("WANDB_RUN_GROUP"),
            job_type: get("WANDB_JOB_TYPE"),
            run_id: get("WANDB_RUN_ID"),
            batch_interval: Duration::from_secs(5),
            heartbeat: Duration::from_secs(30),
            system_every: match get("WANDB_X_STATS_SAMPLING_INTERVAL").map(|s| s.trim().parse::<f64>()) {
                Some(Ok(secs)) if secs <= 0.0 => None,
                Some(Ok(secs)) => Some(Duration::from_secs_f64(secs)),
                Some(Err(_)) => bail!("WANDB_X_STATS_SAMPLING_INTERVAL must be a number of seconds (0 = off)"),
                None => Some(Duration::from_secs(15)),
            },
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            finish_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
        })
    }

    fn client(&self) -> Result<api::Client> {
        let Some(key) = self.key.clone() else { bail!("no W&B API key: put WANDB_API_KEY in secrets.env, the environment or ~/.netrc") };
        Ok(api::Client::new(&self.base_url, key, self.request_timeout))
    }
}

/// `<run>/wandb/`: the spool and file snapshots.
pub fn wandb_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("wandb")
}

/// The history value of a PNG logged as the image `key` at `step` (see [`Run::log_image`]).
pub fn image_value(key: &str, step: i64, png: &[u8]) -> Result<serde_json::Value> {
    use sha2::Digest;
    anyhow::ensure!(png.len() >= 24 && png[..8] == *b"\x89PNG\r\n\x1a\n", "no PNG signature");
    let (width, height) = (u32::from_be_bytes(png[16..20].try_into()?), u32::from_be_bytes(png[20..24].try_into()?)); // IHDR
    let sha: String = sha2::Sha256::digest(png).iter().map(|b| format!("{b:02x}")).collect();
    // The official client's name: the key with path separators replaced, the step, 20 hex digits.
    let stem: String = panel_name(key).chars().map(|c| if c == '/' || c == '.' { '_' } else { c }).collect();
    Ok(serde_json::json!({"_type": "image-file", "path": format!("media/images/{stem}_{step}_{}.png", &sha[..20]),
        "sha256": sha, "size": png.len(), "format": "png", "width": width, "height": height}))
}

/// The usage heatmap (PNG bytes) of a history row's per-expert shares, given as
/// (`<layer>.<expert>` after `expert_usage/`, share) pairs; None when there are none. Drawn in
/// `scratch` (a file removed again).
pub fn usage_heatmap_png<'a>(shares: impl IntoIterator<Item = (&'a str, f64)>, step: i64, scratch: &Path) -> Result<Option<Vec<u8>>> {
    let mut grid: BTreeMap<i64, BTreeMap<i64, f64>> = BTreeMap::new();
    for (k, v) in shares {
        if let Some((l, e)) = k.split_once('.').and_then(|(l, e)| Some((l.parse::<i64>().ok()?, e.parse::<i64>().ok()?))) {
            grid.entry(l).or_default().insert(e, v);
        }
    }
    if grid.is_empty() {
        return Ok(None);
    }
    let n_experts = grid.values().filter_map(|m| m.keys().max()).max().map_or(0, |e| e + 1);
    let layers: Vec<i64> = grid.keys().cloned().collect();
    let rows: Vec<Vec<f64>> = grid.values().map(|m| (0..n_experts).map(|e| m.get(&e).copied().unwrap_or(f64::NAN)).collect()).collect();
    std::fs::create_dir_all(scratch)?;
    let path = scratch.join(format!("expert_usage-{step}.png"));
    crate::interp::plot::share_heatmap(&rows, &layers, &path, &format!("step {step}"))?;
    let png = std::fs::read(&path)?;
    let _ = std::fs::remove_file(&path);
    Ok(Some(png))
}

/// A fresh run id: 8 characters of [a-z0-9], as W&B's.
pub fn new_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    let mut x = h.finish();
    (0..8).map(|_| { let c = b"abcdefghijklmnopqrstuvwxyz0123456789"[(x % 36) as usize] as char; x /= 36; c }).collect()
}

/// `(commit, dirty)` of the git checkout at `root`, if it is one.
pub fn git_info(root: &Path) -> (Option<String>, bool) {
    let run = |args: &[&str]| std::process::Command::new("git").args(args).current_dir(root).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let commit = run(&["rev-parse", "HEAD"]);
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    (commit, dirty)
}

/// This machine's host name.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

#[derive(Debug, Default, Clone)]
struct Status {
    created: bool,
    url: Option<String>,
    lines_seen: usize,
    lines_done: usize,
    fatal: Option<String>,
    complete: bool,
    stopped: bool,
    last_error: Option<String>,
    skipped_files: Vec<String>,
}

/// What `finish` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishReport {
    /// History rows logged in this run's spool, and those the server has.
    pub rows: usize,
    pub rows_sent: usize,
    /// Rows that stayed only in the local spool (upload them later with `sync`).
    pub rows_only_local: usize,
    pub complete: bool,
}

/// A W&B run being logged to. In `Disabled` mode every method is a no-op.
pub struct Run {
    pub mode: Mode,
    id: Option<String>,
    run_dir: PathBuf,
    spool: Option<SpoolWriter>,
    tx: Option<mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    status: Arc<Mutex<Status>>,
    started: Instant,
    runtime_offset: f64,
    last_step: i64,
    finish_timeout: Duration,
    finished: bool,
}

/// Starts (or, with `resume_id`, resumes) a run logging into `<run_dir>/wandb/`. `config` is the
/// run's full config (a JSON object; each key becomes a W&B config entry). Online, this waits up
/// to 10 s for the run to exist on the server to print its URL, then goes on regardless.
pub fn start(run_dir: &Path, settings: Settings, config: &serde_json::Value, resume_id: Option<&str>) -> Result<Run> {
    let mut run = Run {
        mode: settings.mode, id: None, run_dir: run_dir.to_path_buf(), spool: None, tx: None, thread: None,
        status: Arc::default(), started: Instant::now(), runtime_offset: 0.0, last_step: -1,
        finish_timeout: settings.finish_timeout, finished: false,
    };
    if settings.mode == Mode::Disabled {
        match crate::run::launch_rank() {
            0 => println!("wandb: disabled (no WANDB_API_KEY in secrets.env, the environment or ~/.netrc; metrics go to metrics.jsonl only)"),
            r => println!("wandb: rank {r} logs nothing (rank 0 logs the run)"),
        }
        return Ok(run);
    }
    let id = resume_id.map(String::from).or(settings.run_id.clone()).unwrap_or_else(new_run_id);
    let dir = wandb_dir(run_dir);
    let spool_path = dir.join("spool.jsonl");
    // A resumed run continues its runtime clock and step numbering from the spool.
    for r in spool::SpoolReader::new(&spool_path).read_new()? {
        if let Record::History { step, values } = r {
            run.last_step = run.last_step.max(step);
            run.runtime_offset = values.get("_runtime").and_then(|v| v.parse().ok()).unwrap_or(run.runtime_offset);
        }
    }
    let mut writer = SpoolWriter::open(&spool_path)?;
    let root = crate::project_root().unwrap_or_else(|_| run_dir.to_path_buf());
    let (commit, _) = git_info(&root);
    writer.append(&Record::Run(RunInfo {
        id: id.clone(), entity: settings.entity.clone(), project: settings.project.clone(), display_name: settings.name.clone(),
        notes: settings.notes.clone(), tags: settings.tags.clone(), group: settings.group.clone(), job_type: settings.job_type.clone(),
        host: host_name(), program: Some("experiment.ipynb".into()), commit, config: config.clone(), resumed: resume_id.is_some(),
    }))?;
    run.id = Some(id.clone());
    run.spool = Some(writer);
    // config.yaml as W&B writes it (JSON is YAML): {"wandb_version": 1, key: {"desc": null, "value": v}}.
    let mut yaml = serde_json::Map::new();
    yaml.insert("wandb_version".into(), 1.into());
    if let serde_json::Value::Object(m) = config {
        for (k, v) in m {
            yaml.insert(k.clone(), serde_json::json!({ "desc": null, "value": v }));
        }
    }
    run.save_bytes("config.yaml", serde_json::to_string_pretty(&yaml)?.as_bytes())?;
    // The Overview page's machine and code: OS, host, command, git, CPUs, memory, GPUs, CUDA.
    run.save_bytes("wandb-metadata.json", serde_json::to_string_pretty(&metadata::metadata(&root, "experiment.ipynb"))?.as_bytes())?;

    if settings.mode == Mode::Offline {
        println!("wandb: offline; run {id} spooled to {} (upload later: bash setup.sh wandb-sync {})", spool_path.display(), run_dir.display());
        return Ok(run);
    }
    let client = settings.client()?;
    let (tx, rx) = mpsc::sync_channel::<()>(4);
    let status = run.status.clone();
    let s = settings.clone();
    let files_dir = dir.join("files");
    run.thread = Some(std::thread::Builder::new().name("wandb-uploader".into()).spawn(move || {
        // Whether to ask the server what it already has comes from the spool's run record.
        let mut up = Uploader::new(client, spool_path, files_dir, false, s.heartbeat);
        up.hold_newest = true;
        up.system_every = s.system_every; // a live process: its machine's metrics
        upload_loop(up, rx, status, &s);
    })?);
    run.tx = Some(tx);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let st = run.status.lock().unwrap().clone();
        if let Some(url) = st.url {
            println!("wandb: run {id} at {url}");
            return Ok(run);
        }
        if let Some(f) = st.fatal {
            println!("wandb: {f}; training goes on, metrics stay in {} and metrics.jsonl", dir.join("spool.jsonl").display());
            return Ok(run);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let why = run.status.lock().unwrap().last_error.clone().unwrap_or_else(|| "no answer yet".into());
    println!("wandb: run {id} not created yet ({why}); logging goes on into the spool and is retried in the background");
    Ok(run)
}

fn upload_loop(mut up: Uploader, rx: mpsc::Receiver<()>, status: Arc<Mutex<Status>>, s: &Settings) {
    let (mut finishing, mut abandoned) = (false, false);
    let mut failures = 0u32;
    let mut wait = Duration::ZERO;
    loop {
        match rx.recv_timeout(wait) {
            Ok(()) => finishing = true,
            // `finish` sends, then drops its end (a file may still wait for a retry: go on); a Run
            // dropped without finish only drops it: send what is spooled, then stop (the spool keeps it all).
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                abandoned |= !finishing;
                std::thread::sleep(wait);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let result = up.tick();
        {
            let mut st = status.lock().unwrap();
            st.created = up.created.is_some();
            st.url = up.run_url(&s.app_url);
            st.lines_seen = up.lines_seen;
            st.lines_done = up.lines_done;
            st.complete = up.complete_sent;
            st.stopped = up.stopped;
            st.skipped_files = up.skipped_files.clone();
            match &result {
                Ok(_) => st.last_error = None,
                Err(Failure::Transient { what, .. }) => st.last_error = Some(what.clone()),
                Err(Failure::Fatal { what, .. }) => {
                    up.fatal = Some(what.clone());
                    st.fatal = Some(what.clone());
                }
            }
        }
        wait = match result {
            Ok(true) => {
                failures = 0;
                Duration::ZERO
            }
            Ok(false) => {
                failures = 0;
                if up.done() || abandoned { return } else if finishing { Duration::from_millis(50) } else { s.batch_interval }
            }
            Err(Failure::Transient { retry_after, .. }) => {
                failures += 1;
                let backoff = s.retry_base.saturating_mul(1 << failures.min(16).saturating_sub(1)).min(s.retry_max);
                let jitter = backoff.mul_f64(0.25 * (SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) as f64 / 1e9));
                retry_after.unwrap_or(backoff + jitter)
            }
            Err(Failure::Fatal { .. }) => return,
        };
    }
}

impl Run {
    /// The run id (None when disabled).
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The run's URL once the server created it.
    pub fn url(&self) -> Option<String> {
        self.status.lock().unwrap().url.clone()
    }

    /// True after the user pressed Stop in the W&B UI.
    pub fn stopped(&self) -> bool {
        self.status.lock().unwrap().stopped
    }

    /// Logs one history row under the run page's names ([`panel_name`]). `_step` is the row's
    /// integer `step` when it has one (else the next step); `_runtime` and `_timestamp` are added.
    /// Rows with the same step reach the server as one line. Writes one line to the spool; never
    /// waits for the network.
    ///
    /// Per-expert usage (`expert_usage.<layer>.<expert>`, a share for each of L x E experts) is
    /// written to the spool as it is; the uploader thread turns it into one heatmap image under
    /// `expert_usage` ([`usage_heatmap_png`]), off the training thread.
    pub fn log(&mut self, row: Row) -> Result<()> {
        let Some(spool) = &mut self.spool else { return Ok(()) };
        let step = match row.0.get("step") {
            Some(Metric::Int(s)) => *s,
            _ => self.last_step + 1,
        };
        let mut row = Row(row.0.into_iter().map(|(k, v)| (panel_name(&k), v)).collect());
        self.last_step = self.last_step.max(step);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        row.0.insert("_step".into(), Metric::Int(step));
        row.0.insert("_runtime".into(), Metric::Float(self.runtime_offset + self.started.elapsed().as_secs_f64()));
        row.0.insert("_timestamp".into(), Metric::Float(now));
        let values = row.0.iter().map(|(k, v)| (k.clone(), v.to_json_text())).collect();
        spool.append(&Record::History { step, values })
    }

    /// Marks the run preempting (the process got SIGTERM and is about to end): W&B shows it so,
    /// not as crashed, until it finishes or a resumed process continues it.
    pub fn mark_preempting(&mut self) -> Result<()> {
        let Some(spool) = &mut self.spool else { return Ok(()) };
        spool.append(&Record::Preempting)?;
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(()); // send it now rather than at the next batch
        }
        Ok(())
    }

    /// Sets summary values (merged with the last value of every logged key).
    pub fn summary(&mut self, row: Row) -> Result<()> {
        let Some(spool) = &mut self.spool else { return Ok(()) };
        spool.append(&Record::Summary { values: row.0.iter().map(|(k, v)| (panel_name(k), v.to_json_text())).collect() })
    }

    /// Logs the PNG at `path` as the image `key` at `step`, as the official client logs a
    /// `wandb.Image`: the file goes up as `media/images/<key>_<step>_<sha256[..20]>.png` and the
    /// history row holds `{"_type": "image-file", "path", "sha256", "size", "format", "width",
    /// "height"}`, so the run page shows it in the key's panel section with a step slider.
    pub fn log_image(&mut self, key: &str, path: &Path, step: i64) -> Result<()> {
        if self.spool.is_none() {
            return Ok(());
        }
        let bytes = std::fs::read(path).with_cause(|| format!("cannot read {}", path.display()))?;
        let value = image_value(key, step, &bytes).with_cause(|| format!("{} is not a PNG", path.display()))?;
        let name = value["path"].as_str().unwrap().to_string();
        self.save_bytes(&name, &bytes)?;
        self.log(Row::new().with("step", step).with(key, value))
    }

    /// Uploads a file as a run file (snapshotted now under `<run>/wandb/files/`).
    pub fn save_file(&mut self, path: &Path) -> Result<()> {
        if self.spool.is_none() {
            return Ok(());
        }
        let bytes = std::fs::read(path).with_cause(|| format!("cannot read {}", path.display()))?;
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "file".into());
        self.save_bytes(&name, &bytes)
    }

    fn save_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let Some(spool) = &mut self.spool else { return Ok(()) };
        let p = wandb_dir(&self.run_dir).join("files").join(name);
        std::fs::create_dir_all(p.parent().unwrap())?;
        crate::run::write_atomic(&p, bytes)?;
        spool.append(&Record::File { name: name.to_string() })
    }

    /// Marks the run finished (exit code 0) or failed (non-zero), waits up to the finish timeout
    /// for the spool to be sent, and says what, if anything, stayed only local.
    pub fn finish(&mut self, exitcode: i32) -> Result<FinishReport> {
        if self.finished || self.spool.is_none() {
            return Ok(FinishReport { rows: 0, rows_sent: 0, rows_only_local: 0, complete: self.mode == Mode::Disabled });
        }
        self.finished = true;
        self.spool.as_mut().unwrap().append(&Record::Finish { exitcode })?;
        let spool = wandb_dir(&self.run_dir).join("spool.jsonl");
        let rows = spool::history_lines(&spool::SpoolReader::new(&spool).read_new()?);
        if self.mode == Mode::Offline {
            println!("wandb: offline run {} finished; {rows} rows in {} (upload: bash setup.sh wandb-sync {})", self.id.as_deref().unwrap_or(""), spool.display(), self.run_dir.display());
            return Ok(FinishReport { rows, rows_sent: 0, rows_only_local: rows, complete: false });
        }
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(());
        }
        let t0 = Instant::now();
        while t0.elapsed() < self.finish_timeout {
            let st = self.status.lock().unwrap().clone();
            if st.complete || st.fatal.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let st = self.status.lock().unwrap().clone();
        let report = FinishReport { rows, rows_sent: st.lines_done.min(rows), rows_only_local: rows - st.lines_done.min(rows), complete: st.complete };
        for f in &st.skipped_files {
            println!("wandb: file not uploaded: {f}; it stays in {}", self.run_dir.display());
        }
        if report.complete {
            // `sync` has nothing left to do for this spool.
            let _ = crate::run::write_atomic(&wandb_dir(&self.run_dir).join("synced"), std::fs::metadata(&spool).map(|m| m.len()).unwrap_or(0).to_string().as_bytes());
            println!("wandb: run finished (exit code {exitcode}), {} rows sent{}", report.rows_sent, st.url.map(|u| format!(": {u}")).unwrap_or_default());
        } else {
            println!("wandb: {} of {rows} rows stayed only in the local spool {} ({}); upload them with: bash setup.sh wandb-sync {}",
                report.rows_only_local, spool.display(), st.fatal.or(st.last_error).unwrap_or_else(|| "timed out".into()), self.run_dir.display());
        }
        Ok(report)
    }
}

/// Uploads the spool of `run_dir` (an offline run, or one whose uploads failed) with the same
/// client: creates or resumes the run, sends the rows the server does not have, files, summary
/// and the recorded exit code. Retries transient failures; gives up on fatal ones.
pub fn sync(run_dir: &Path, settings: &Settings) -> Result<FinishReport> {
    let dir = wandb_dir(run_dir);
    let spool = dir.join("spool.jsonl");
    if !spool.is_file() {
        bail!("{} has no W&B spool ({}); was the run logged with WANDB_MODE=offline?", run_dir.display(), spool.display());
    }
    let marker = dir.join("synced");
    let spool_len = std::fs::metadata(&spool)?.len();
    if std::fs::read_to_string(&marker).ok().and_then(|s| s.trim().parse::<u64>().ok()) == Some(spool_len) {
        println!("wandb: {} is already uploaded (nothing new in the spool)", run_dir.display());
        return Ok(FinishReport { rows: 0, rows_sent: 0, rows_only_local: 0, complete: true });
    }
    let mut up = Uploader::new(settings.client()?, spool, dir.join("files"), true, settings.heartbeat);
    let mut failures = 0u32;
    loop {
        match up.tick() {
            Ok(true) => failures = 0,
            Ok(false) if up.done() || up.created.is_some() => break,
            Ok(false) => bail!("the spool of {} has no run record", run_dir.display()),
            Err(Failure::Transient { what, retry_after }) => {
                failures += 1;
                if failures > 12 {
                    bail!("W&B still unreachable after {failures} attempts: {what}; run sync again later");
                }
                std::thread::sleep(retry_after.unwrap_or(settings.retry_base.saturating_mul(1 << failures.min(6)).min(settings.retry_max)));
            }
            Err(Failure::Fatal { what, .. }) => bail!("{what}"),
        }
    }
    if let Some(url) = up.run_url(&settings.app_url) {
        println!("wandb: synced {} rows to {url}", up.lines_done);
    }
    if up.complete_sent {
        // Remember what was uploaded, so syncing again does not upload the files twice.
        crate::run::write_atomic(&marker, spool_len.to_string().as_bytes())?;
    }
    Ok(FinishReport { rows: up.lines_seen, rows_sent: up.lines_done, rows_only_local: up.lines_seen - up.lines_done, complete: up.complete_sent })
}

#[cfg(test)]
mod names {
    use super::panel_name;

    #[test]
    fn metrics_get_the_sections_w_and_b_groups_panels_by() {
        for (key, name) in [
            ("train.loss", "train/loss"), ("train.aux_loss", "train/aux_loss"), ("val.loss", "val/loss"),
            ("lr", "train/lr"), ("grad_norm", "train/grad_norm"), ("grad_norm.experts", "train/grad_norm.experts"),
            ("tokens", "train/tokens"), ("skipped_steps", "train/skipped_steps"), ("nonfinite.first", "train/nonfinite.first"),
            ("tokens_per_s", "perf/tokens_per_s"), ("mfu", "perf/mfu"), ("mfu.datasheet", "perf/mfu.datasheet"),
            ("memory.peak_rss_gib", "perf/memory.peak_rss_gib"), ("expert_usage.3.7", "expert_usage/3.7"),
            ("interp.consistency.0", "interp/consistency.0"), ("step", "step"), ("_step", "_step"),
            ("best_val", "best_val"), ("already/grouped", "already/grouped"), ("mfu_note", "mfu_note"),
        ] {
            assert_eq!(panel_name(key), name, "{key}");
        }
    }
}
