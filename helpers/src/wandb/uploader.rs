//! Sends a spool to W&B: creates (or resumes) the run, streams history lines with contiguous
//! offsets, keeps the full summary up to date, uploads files and finally marks the run complete.
//! The same code runs in the background thread of an online run and in `sync` for offline runs.
//!
//! A request that fails is re-sent byte for byte (same offsets), so retries never duplicate lines.
//! After resuming, rows whose step the server already has are dropped: an exactly resumed run logs
//! the same values again for the steps between its checkpoint and the crash.
use super::api::{Client, Failure};
use super::spool::{add_row, object_text, Line, Record, RunInfo, SpoolReader};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MAX_LINES: usize = 1000;
const MAX_BYTES: usize = 8 << 20; // under W&B's 10 MiB request limit

#[derive(Debug, Clone, Copy, PartialEq)]
enum Preempting {
    No,
    ToSend,
    InFlight,
    Sent,
}

struct InFlight {
    body: String,
    lines: usize,
    last_step: i64,
    complete: bool,
    uploaded: usize,
    /// System-metric lines it carries.
    events: usize,
}

pub struct Uploader {
    client: Client,
    reader: SpoolReader,
    files_dir: PathBuf,
    /// Query the server for lines it already has (resumed runs, sync).
    check_server: bool,
    run: Option<RunInfo>,
    need_upsert: bool,
    /// (entity, project) as the server named them.
    pub created: Option<(String, String)>,
    offset: i64,
    server_last_step: i64,
    /// Rows not yet sent, oldest first. Rows logged with the same step are merged into one line
    /// (a skipped step and that step's log row), as the official client does.
    pending: VecDeque<Line<BTreeMap<String, String>>>,
    preempting: Preempting,
    /// Run records read so far: which process logged a row.
    process: u32,
    /// Keep the newest row back until a later step (or the finish) arrives, so a row logged with
    /// its step's number a moment later still merges into it rather than going out as a second
    /// line with the same `_step`. The live client holds; `sync` of a finished spool does not.
    pub hold_newest: bool,
    inflight: Option<InFlight>,
    summary: BTreeMap<String, String>,
    summary_dirty: bool,
    files: VecDeque<String>,
    uploaded: Vec<String>,
    finish: Option<i32>,
    pub complete_sent: bool,
    pub fatal: Option<String>,
    pub stopped: bool,
    /// History lines read from the spool, and those the server acknowledged or already had.
    pub lines_seen: usize,
    pub lines_done: usize,
    last_post: Instant,
    heartbeat: Duration,
    /// Files the storage refused (name: why); they never hold up the metrics.
    pub skipped_files: Vec<String>,
    file_failures: u32,
    file_retry_at: Option<Instant>,
    /// System metrics (`wandb-events.jsonl`) every this long; None (sync of a spool): none.
    pub system_every: Option<Duration>,
    system: Option<super::system::Sampler>,
    last_system: Option<Instant>,
    events: Vec<String>,
    events_offset: i64,
    started: Instant,
}

/// Tries of one file upload that fails transiently before it is skipped.
const FILE_TRIES: u32 = 6;

impl Uploader {
    pub fn new(client: Client, spool: PathBuf, files_dir: PathBuf, check_server: bool, heartbeat: Duration) -> Self {
        Self {
            client, reader: SpoolReader::new(&spool), files_dir, check_server, run: None, need_upsert: false, created: None,
            offset: 0, server_last_step: -1, pending: VecDeque::new(), preempting: Preempting::No, process: 0, hold_newest: false, inflight: None, summary: BTreeMap::new(),
            summary_dirty: false, files: VecDeque::new(), uploaded: Vec::new(), finish: None, complete_sent: false,
            fatal: None, stopped: false, lines_seen: 0, lines_done: 0, last_post: Instant::now(), heartbeat,
            skipped_files: Vec::new(), file_failures: 0, file_retry_at: None,
            system_every: None, system: None, last_system: None, events: Vec::new(), events_offset: 0, started: Instant::now(),
        }
    }

    /// Nothing left to do: the run is complete on the server, or sending gave up.
    pub fn done(&self) -> bool {
        self.complete_sent || self.fatal.is_some()
    }

    pub fn run_url(&self, app_url: &str) -> Option<String> {
        let (entity, project) = self.created.as_ref()?;
        Some(format!("{app_url}/{entity}/{project}/runs/{}", self.run.as_ref()?.id))
    }

    fn ingest(&mut self) -> std::io::Result<()> {
        let records = self.reader.read_new().map_err(|e| std::io::Error::other(e.to_string()))?;
        for r in records {
            match r {
                Record::Run(info) => {
                    // A new process continues the run: what an earlier one recorded about its own
                    // end (a finish, preempting) is history; the server saw it then.
                    self.finish = None;
                    self.preempting = Preempting::No;
                    self.process += 1;
                    self.check_server |= info.resumed;
                    self.run = Some(info);
                    self.need_upsert = true;
                }
                // The summary takes a row's values when the row is sent (next_request): a row held
                // back must not show in the summary's `_step`, which a resumed run reads as the
                // last step the server has.
                Record::History { step, mut values } => {
                    self.usage_image(step, &mut values);
                    // A resumed process logs again the steps after its checkpoint: its rows replace
                    // the unsent rows an earlier process left for those steps (its held newest row).
                    let row = Line { step, process: self.process, values };
                    self.lines_seen = (self.lines_seen as isize + add_row(&mut self.pending, row, |a, b| a.extend(b))) as usize;
                }
                Record::Summary { values } => {
                    self.summary.extend(values);
                    self.summary_dirty = true;
                }
                Record::File { name } => self.files.push_back(name),
                Record::Preempting => self.preempting = Preempting::ToSend,
                Record::Finish { exitcode } => self.finish = Some(exitcode),
            }
        }
        Ok(())
    }

    /// A row's per-expert usage shares (`expert_usage/<layer>.<expert>`, L x E of them) become one
    /// heatmap image under `expert_usage`, its file queued for upload, instead of L x E scalar
    /// panels (`metrics.jsonl` keeps the numbers). Drawn here, in the uploader's thread (or by
    /// `sync`), not in the training loop. A row whose heatmap cannot be drawn keeps no usage.
    fn usage_image(&mut self, step: i64, values: &mut BTreeMap<String, String>) {
        let keys: Vec<String> = values.keys().filter(|k| k.starts_with("expert_usage/")).cloned().collect();
        if keys.is_empty() {
            return;
        }
        let shares: Vec<(String, f64)> = keys.iter().map(|k| (k["expert_usage/".len()..].to_string(), values[k].parse::<f64>().unwrap_or(f64::NAN))).collect();
        keys.iter().for_each(|k| { values.remove(k); });
        let png = super::usage_heatmap_png(shares.iter().map(|(k, v)| (k.as_str(), *v)), step, &self.files_dir.join("scratch"));
        let Ok(Some(png)) = png else { return };
        let Ok(value) = super::image_value("expert_usage", step, &png) else { return };
        let name = value["path"].as_str().unwrap().to_string();
        let path = self.files_dir.join(&name);
        let written = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|_| std::fs::write(&path, &png));
        if written.is_ok() {
            self.files.push_back(name);
            values.insert("expert_usage".into(), value.to_string());
        }
    }

    fn ensure_run(&mut self) -> Result<(), Failure> {
        let Some(run) = self.run.clone() else { return Ok(()) };
        if !self.need_upsert {
            return Ok(());
        }
        let config: serde_json::Map<String, Value> = match &run.config {
            Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), json!({ "value": v }))).collect(),
            other => [("config".to_string(), json!({ "value": other }))].into_iter().collect(),
        };
        let mut vars = json!({
            "name": run.id, "project": run.project, "entity": run.entity, "displayName": run.display_name,
            "notes": run.notes, "groupName": run.group, "jobType": run.job_type,
            "host": run.host, "program": run.program, "commit": run.commit,
            "config": Value::Object(config).to_string(),
        });
        // Tags only when this run sets some: `tags: []` would wipe the tags set in the UI.
        if !run.tags.is_empty() {
            vars["tags"] = json!(run.tags);
        }
        let data = self.client.upsert_bucket(vars)?;
        let bucket = &data["upsertBucket"]["bucket"];
        // A new run whose id already exists (WANDB_RUN_ID reused without resuming): its history
        // continues after the lines the server has, as the official client's does, rather than
        // overwriting them from offset 0.
        if self.created.is_none() && !self.check_server {
            self.offset = bucket["historyLineCount"].as_i64().unwrap_or(0);
        }
        let project = bucket["project"]["name"].as_str().unwrap_or(&run.project).to_string();
        let entity = bucket["project"]["entity"]["name"].as_str().map(String::from).or(run.entity.clone());
        let Some(entity) = entity else {
            return Err(Failure::Fatal { status: 200, what: "W&B did not say which entity the run belongs to; set WANDB_ENTITY".into() });
        };
        if self.check_server && self.created.is_none() {
            let status = self.client.run_resume_status(&entity, &project, &run.id)?;
            let b = &status["model"]["bucket"];
            self.offset = b["historyLineCount"].as_i64().unwrap_or(0);
            self.events_offset = b["eventsLineCount"].as_i64().unwrap_or(0);
            let summary: Value = b["summaryMetrics"].as_str().and_then(|s| serde_json::from_str(s).ok()).unwrap_or(Value::Null);
            self.server_last_step = summary["_step"].as_i64().unwrap_or(if self.offset > 0 { i64::MAX } else { -1 });
        }
        self.created = Some((entity, project));
        self.need_upsert = false;
        Ok(())
    }

    /// Uploads the files queued so far. W&B's own API failing is the run's failure (a bad key, an
    /// outage); the storage refusing a file is not: a transient refusal (408, 409, 429, 5xx, no
    /// answer) is retried later with a backoff, up to FILE_TRIES times, any other skips that file.
    /// Either way the metrics go on.
    fn upload_files(&mut self) -> Result<(), Failure> {
        let Some((entity, project)) = self.created.clone() else { return Ok(()) };
        if self.file_retry_at.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        let run = self.run.as_ref().unwrap().id.clone();
        while let Some(name) = self.files.front().cloned() {
            let data = self.client.create_run_files(&entity, &project, &run, std::slice::from_ref(&name))?;
            let c = &data["createRunFiles"];
            let headers: Vec<String> = c["uploadHeaders"].as_array().map(|a| a.iter().filter_map(|h| h.as_str().map(String::from)).collect()).unwrap_or_default();
            let url = c["files"].as_array().and_then(|f| f.iter().find(|f| f["name"] == name.as_str())).and_then(|f| f["uploadUrl"].as_str()).map(String::from);
            let Some(url) = url else {
                return Err(Failure::Fatal { status: 200, what: format!("W&B gave no upload URL for {name}") });
            };
            let bytes = std::fs::read(self.files_dir.join(&name)).unwrap_or_default();
            match self.client.upload(&url, &headers, bytes) {
                Ok(()) => {
                    self.files.pop_front();
                    self.uploaded.push(name);
                    self.file_failures = 0;
                }
                Err(Failure::Transient { retry_after, .. }) if self.file_failures + 1 < FILE_TRIES => {
                    self.file_failures += 1;
                    let backoff = Duration::from_millis(250u64 << self.file_failures.min(6));
                    self.file_retry_at = Some(Instant::now() + retry_after.unwrap_or(backoff));
                    return Ok(());
                }
                Err(f) => {
                    self.files.pop_front();
                    self.skipped_files.push(format!("{name} ({})", f));
                    self.file_failures = 0;
                }
            }
        }
        Ok(())
    }

    fn summary_line(&self) -> String {
        let runtime = self.summary.get("_runtime").and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let mut entries: Vec<(&str, String)> = self.summary.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        entries.push(("_wandb", format!("{{\"runtime\":{}}}", runtime.max(0.0) as i64)));
        object_text(entries.into_iter())
    }

    fn next_request(&mut self) -> Option<InFlight> {
        // Rows the server already has (a resumed run re-logging the steps after its checkpoint).
        while self.pending.front().is_some_and(|l| l.step <= self.server_last_step) {
            let line = self.pending.pop_front().unwrap();
            self.summary.extend(line.values); // sent before; the summary keeps the last value of every key
            self.lines_done += 1;
        }
        let (mut lines, mut bytes, mut last_step) = (Vec::new(), 0, self.server_last_step);
        let held = usize::from(self.hold_newest && self.finish.is_none());
        while self.pending.len() > held {
            let front = self.pending.front().unwrap();
            let (step, line) = (front.step, object_text(front.values.iter().map(|(k, v)| (k.as_str(), v.clone()))));
            if lines.len() >= MAX_LINES || (bytes + line.len() > MAX_BYTES && !lines.is_empty()) {
                break;
            }
            bytes += line.len();
            last_step = step;
            lines.push(line);
            let sent = self.pending.pop_front().unwrap();
            self.summary.extend(sent.values);
            self.summary_dirty = true;
        }
        self.sample_system();
        let drained = self.pending.is_empty() && self.files.is_empty();
        let complete = drained && self.finish.is_some() && !self.complete_sent;
        let heartbeat_due = self.last_post.elapsed() >= self.heartbeat && !self.complete_sent;
        let preempting = self.preempting == Preempting::ToSend;
        if lines.is_empty() && self.events.is_empty() && !self.summary_dirty && self.uploaded.is_empty() && !complete && !heartbeat_due && !preempting {
            return None;
        }
        let mut files = serde_json::Map::new();
        if !lines.is_empty() {
            files.insert("wandb-history.jsonl".into(), json!({ "offset": self.offset, "content": lines }));
        }
        if self.summary_dirty {
            files.insert("wandb-summary.json".into(), json!({ "offset": 0, "content": [self.summary_line()] }));
        }
        if !self.events.is_empty() {
            files.insert("wandb-events.jsonl".into(), json!({ "offset": self.events_offset, "content": self.events }));
        }
        let mut body = serde_json::Map::new();
        if !files.is_empty() {
            body.insert("files".into(), Value::Object(files));
        }
        if !self.uploaded.is_empty() {
            body.insert("uploaded".into(), json!(self.uploaded));
        }
        if preempting {
            // As the official client's mark_preempting: the run shows as preempting, not crashed.
            body.insert("preempting".into(), json!(true));
            self.preempting = Preempting::InFlight;
        }
        if complete {
            body.insert("complete".into(), json!(true));
            body.insert("exitcode".into(), json!(self.finish.unwrap()));
        }
        self.summary_dirty = false;
        Some(InFlight { body: Value::Object(body).to_string(), lines: lines.len(), last_step, complete, uploaded: self.uploaded.len(), events: self.events.len() })
    }

    /// Takes a system sample when one is due (a line of `wandb-events.jsonl`).
    fn sample_system(&mut self) {
        let Some(every) = self.system_every else { return };
        if self.last_system.is_some_and(|t| t.elapsed() < every) || self.finish.is_some() {
            return;
        }
        let first = self.system.is_none();
        let sampler = self.system.get_or_insert_with(super::system::Sampler::new);
        self.last_system = Some(Instant::now());
        if first {
            return; // the CPU share needs two readings
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let mut values: Vec<(&str, String)> = vec![("_wandb", "true".into()), ("_timestamp", format!("{now}")), ("_runtime", format!("{}", self.started.elapsed().as_secs_f64()))];
        let sample = sampler.sample();
        values.extend(sample.iter().map(|(k, v)| (k.as_str(), super::spool::Metric::Float(*v).to_json_text())));
        self.events.push(object_text(values.into_iter()));
    }

    /// One round: read new spool records, create the run if needed, upload files, send one
    /// file_stream request. `Ok(true)` if more is ready to send right away.
    pub fn tick(&mut self) -> Result<bool, Failure> {
        if self.done() {
            return Ok(false);
        }
        self.ingest().map_err(|e| Failure::Fatal { status: 0, what: format!("cannot read the spool: {e}") })?;
        self.ensure_run()?;
        let Some((entity, project)) = self.created.clone() else { return Ok(false) };
        self.upload_files()?;
        if self.inflight.is_none() {
            self.inflight = self.next_request();
        }
        let Some(req) = &self.inflight else { return Ok(false) };
        let run = self.run.as_ref().unwrap().id.clone();
        let resp = self.client.file_stream(&entity, &project, &run, req.body.clone())?;
        let req = self.inflight.take().unwrap();
        self.offset += req.lines as i64;
        self.lines_done += req.lines;
        self.server_last_step = self.server_last_step.max(req.last_step);
        self.uploaded.drain(..req.uploaded);
        self.events.drain(..req.events);
        self.events_offset += req.events as i64;
        self.complete_sent |= req.complete;
        if self.preempting == Preempting::InFlight {
            self.preempting = Preempting::Sent;
        }
        self.stopped |= resp["stopped"].as_bool().unwrap_or(false);
        self.last_post = Instant::now();
        let held = usize::from(self.hold_newest && self.finish.is_none());
        Ok(self.pending.len() > held || (self.finish.is_some() && !self.complete_sent))
    }
}
