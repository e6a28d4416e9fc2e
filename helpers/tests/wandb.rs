//! The W&B client against a fake W&B server on 127.0.0.1 that speaks the protocol of
//! docs/wandb.md and checks what it receives: Basic auth, UpsertBucket variables, file_stream
//! offsets (no gaps, no duplicates), `_step`/`_runtime`/`_timestamp`, the full summary at offset 0,
//! NaN/Infinity, the final `complete`, uploads without credentials. Faults: 500s, 429 with
//! Retry-After, an unreachable server, a hanging server, a 401.
use helpers::wandb::{self, Mode, Row, Settings};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Debug, Clone)]
enum Fault {
    Status(u16),
    RetryAfter(u64),
    /// Close the connection without answering (as an unreachable server).
    Drop,
}

#[derive(Default, Debug, Clone)]
struct FakeRun {
    upserts: Vec<Value>,
    history: Vec<String>,
    summary: Option<String>,
    complete: Option<i64>,
    /// A request said `"preempting": true` (before `complete`, if any).
    preempting: bool,
    uploaded: Vec<String>,
    files: HashMap<String, Vec<u8>>,
    /// Lines of wandb-events.jsonl (system metrics).
    events: Vec<String>,
}

#[derive(Default)]
struct State {
    runs: HashMap<String, FakeRun>,
    violations: Vec<String>,
    faults: Vec<Fault>,
    /// file_stream requests answered with a fault until this time (an outage).
    down_until: Option<Instant>,
    hang: bool,
    /// Answers of the storage to uploads of a file, in order (then 200).
    upload_faults: HashMap<String, Vec<u16>>,
    requests: usize,
    bodies: Vec<String>,
    /// Stop was pressed on the run page.
    stop_pressed: bool,
}

struct Fake {
    url: String,
    state: Arc<Mutex<State>>,
}

fn unnan(line: &str) -> Value {
    let fixed = line.replace(":NaN", ":\"NaN\"").replace(":-Infinity", ":\"-Infinity\"").replace(":Infinity", ":\"Infinity\"");
    serde_json::from_str(&fixed).unwrap_or(Value::Null)
}

impl Fake {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state: Arc<Mutex<State>> = Arc::default();
        let (st, base) = (state.clone(), url.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (st, base) = (st.clone(), base.clone());
                std::thread::spawn(move || serve(conn, st, base));
            }
        });
        Self { url, state }
    }
    fn run(&self, id: &str) -> FakeRun {
        self.state.lock().unwrap().runs.get(id).cloned().unwrap_or_default()
    }
    fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }
}

fn serve(conn: TcpStream, st: Arc<Mutex<State>>, base: String) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut l = String::new();
            reader.read_line(&mut l).unwrap();
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.insert(k.trim().to_lowercase(), v.trim().to_string());
            }
        }
        let n: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; n];
        reader.read_exact(&mut body).unwrap();
        let parts: Vec<&str> = request_line.split_whitespace().collect();
        let (method, path) = (parts[0], parts[1]);
        while st.lock().unwrap().hang {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (status, extra, resp) = handle(&st, &base, method, path, &headers, &body);
        if status == 0 {
            return; // drop the connection
        }
        let text = format!("HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{resp}", resp.len());
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

fn handle(st: &Mutex<State>, base: &str, method: &str, path: &str, headers: &HashMap<String, String>, body: &[u8]) -> (u16, String, String) {
    let mut s = st.lock().unwrap();
    s.requests += 1;
    let auth = headers.get("authorization").cloned().unwrap_or_default();
    if path.starts_with("/upload/") {
        if !auth.is_empty() {
            s.violations.push(format!("credentials sent to the upload URL {path}"));
        }
        let (run, name) = path["/upload/".len()..].split_once('/').unwrap();
        if let Some(status) = s.upload_faults.get_mut(name).and_then(|f| (!f.is_empty()).then(|| f.remove(0))) {
            return (status, String::new(), "<Error>refused</Error>".into());
        }
        s.runs.entry(run.to_string()).or_default().files.insert(name.to_string(), body.to_vec());
        return (200, String::new(), String::new());
    }
    let text = String::from_utf8_lossy(body).to_string();
    s.bodies.push(text.clone());
    use base64::Engine;
    if auth != format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("api:{KEY}"))) {
        return (401, String::new(), r#"{"error":"unauthorized"}"#.into());
    }
    if text.contains(KEY) {
        s.violations.push("the API key appeared in a request body".into());
    }
    let is_stream = path.ends_with("/file_stream");
    if is_stream || path == "/graphql" {
        if s.down_until.is_some_and(|t| Instant::now() < t) {
            return (0, String::new(), String::new());
        }
        if !s.faults.is_empty() {
            match s.faults.remove(0) {
                Fault::Status(c) => return (c, String::new(), "{}".into()),
                Fault::RetryAfter(secs) => return (429, format!("Retry-After: {secs}\r\n"), "{}".into()),
                Fault::Drop => return (0, String::new(), String::new()),
            }
        }
    }
    if method == "POST" && path == "/graphql" {
        let req: Value = serde_json::from_str(&text).unwrap();
        let vars = &req["variables"];
        return match req["operationName"].as_str().unwrap_or("") {
            "UpsertBucket" => {
                let id = vars["name"].as_str().unwrap_or("").to_string();
                if id.len() != 8 || !id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
                    s.violations.push(format!("run id {id:?} is not 8 chars of [a-z0-9]"));
                }
                match vars["config"].as_str().map(serde_json::from_str::<Value>) {
                    Some(Ok(Value::Object(m))) if m.values().all(|v| v.get("value").is_some()) => {}
                    other => s.violations.push(format!("config is not a JSON string of {{key: {{\"value\": v}}}}: {other:?}")),
                }
                let run = s.runs.entry(id.clone()).or_default();
                run.upserts.push(vars.clone());
                let lines = run.history.len();
                (200, String::new(), json!({"data": {"upsertBucket": {"bucket": {"id": "b", "name": id, "displayName": "x",
                    "project": {"id": "p", "name": vars["project"], "entity": {"id": "e", "name": "fake-entity"}}, "historyLineCount": lines}, "inserted": true}}}).to_string())
            }
            "RunResumeStatus" => {
                let id = vars["name"].as_str().unwrap_or("");
                let bucket = s.runs.get(id).filter(|r| !r.history.is_empty()).map(|r| {
                    json!({"id": "b", "name": id, "historyLineCount": r.history.len(), "summaryMetrics": r.summary.clone().map(|x| unnan(&x).to_string())})
                });
                (200, String::new(), json!({"data": {"model": {"id": "p", "name": vars["project"], "entity": {"name": "fake-entity"}, "bucket": bucket}}}).to_string())
            }
            "CreateRunFiles" => {
                let run = vars["run"].as_str().unwrap_or("");
                let files: Vec<Value> = vars["files"].as_array().unwrap().iter().map(|f| json!({"name": f, "uploadUrl": format!("{base}/upload/{run}/{}", f.as_str().unwrap())})).collect();
                (200, String::new(), json!({"data": {"createRunFiles": {"runID": "r", "uploadHeaders": ["X-Upload-Test: yes"], "files": files}}}).to_string())
            }
            op => (400, String::new(), format!("{{\"errors\": [\"unknown operation {op}\"]}}")),
        };
    }
    if method == "POST" && is_stream {
        let run_id = path.split('/').nth(4).unwrap_or("").to_string();
        let req: Value = serde_json::from_str(&text).unwrap();
        let mut violations = Vec::new();
        let run = s.runs.entry(run_id).or_default();
        if let Some(h) = req["files"].get("wandb-history.jsonl") {
            let offset = h["offset"].as_u64().unwrap() as usize;
            if offset != run.history.len() {
                violations.push(format!("history offset {offset} but {} lines received so far", run.history.len()));
            }
            for line in h["content"].as_array().unwrap() {
                let line = line.as_str().unwrap();
                let v = unnan(line);
                if !(v["_step"].is_i64() && v["_runtime"].is_f64() && v["_timestamp"].is_f64()) {
                    violations.push(format!("history line without _step/_runtime/_timestamp: {line}"));
                }
                run.history.push(line.to_string());
            }
        }
        if let Some(ev) = req["files"].get("wandb-events.jsonl") {
            let offset = ev["offset"].as_u64().unwrap() as usize;
            if offset != run.events.len() {
                violations.push(format!("events offset {offset} but {} lines received so far", run.events.len()));
            }
            run.events.extend(ev["content"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()));
        }
        if let Some(sm) = req["files"].get("wandb-summary.json") {
            if sm["offset"] != 0 || sm["content"].as_array().map(|a| a.len()) != Some(1) {
                violations.push("summary not one line at offset 0".into());
            }
            run.summary = sm["content"][0].as_str().map(String::from);
        }
        for u in req["uploaded"].as_array().into_iter().flatten() {
            run.uploaded.push(u.as_str().unwrap().to_string());
        }
        if req["preempting"] == true {
            run.preempting = run.complete.is_none();
        }
        if req["complete"] == true {
            run.complete = req["exitcode"].as_i64();
        }
        s.violations.extend(violations);
        // The Stop button on the run page: W&B answers file_stream with `"stopped": true`.
        let body = if s.stop_pressed { r#"{"stopped": true}"# } else { "{}" };
        return (200, String::new(), body.into());
    }
    (404, String::new(), "{}".into())
}

fn settings(url: &str, mode: Mode) -> Settings {
    let d = tempfile::tempdir().unwrap();
    std::env::remove_var("WANDB_API_KEY");
    let mut s = Settings::from_env(d.path(), "test-project").unwrap();
    s.mode = mode;
    s.key = Some(wandb::ApiKey::new(KEY));
    s.base_url = url.to_string();
    s.app_url = "https://wandb.example".into();
    s.batch_interval = Duration::from_millis(100);
    s.retry_base = Duration::from_millis(50);
    s.retry_max = Duration::from_millis(400);
    s.finish_timeout = Duration::from_secs(30);
    s.request_timeout = Duration::from_secs(5);
    s
}

fn config() -> Value {
    json!({"model": {"hidden_size": 64}, "train": {"lr": 0.001}, "preset": "cpu"})
}

fn log_rows(run: &mut wandb::Run, steps: std::ops::Range<i64>) {
    for step in steps {
        let mut row = Row::from_json(&json!({"step": step, "train": {"loss": 10.0 - step as f64 * 0.1}, "lr": 1e-3}));
        if step == 3 {
            row = row.with("grad_norm", f64::NAN).with("big", f64::INFINITY).with("small", f64::NEG_INFINITY);
        }
        if step == 4 {
            // A notebook's row: json! turns a NaN into null, which goes out as NaN, not null.
            row = Row::from_json(&json!({"step": step, "train": {"loss": f64::NAN}, "lr": 1e-3}));
        }
        run.log(row).unwrap();
    }
}

fn steps_of(run: &FakeRun) -> Vec<i64> {
    run.history.iter().map(|l| unnan(l)["_step"].as_i64().unwrap()).collect()
}

fn no_key_on_disk(dir: &Path) {
    for e in walk(dir) {
        let bytes = std::fs::read(&e).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains(KEY), "the API key is in {}", e.display());
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() { out.extend(walk(&e.path())) } else { out.push(e.path()) }
    }
    out
}

#[test]
fn online_run_sends_config_history_summary_files_and_complete() {
    let fake = Fake::start();
    let d = tempfile::tempdir().unwrap();
    let mut run = wandb::start(d.path(), settings(&fake.url, Mode::Online), &config(), None).unwrap();
    let id = run.id().unwrap().to_string();
    assert_eq!(run.url().unwrap(), format!("https://wandb.example/fake-entity/test-project/runs/{id}"));
    log_rows(&mut run, 0..20);
    run.summary(Row::new().with("best_val", 1.25)).unwrap();
    let png = d.path().join("training_curves.png");
    std::fs::write(&png, b"\x89PNG fake").unwrap();
    run.save_file(&png).unwrap();
    let report = run.finish(0).unwrap();
    assert_eq!(report, wandb::FinishReport { rows: 20, rows_sent: 20, rows_only_local: 0, complete: true });

    assert_eq!(fake.violations(), Vec::<String>::new());
    let r = fake.run(&id);
    assert_eq!(steps_of(&r), (0..20).collect::<Vec<_>>());
    assert!(r.history[3].contains(r#""train/grad_norm":NaN"#) && r.history[3].contains(r#""big":Infinity"#) && r.history[3].contains(r#""small":-Infinity"#), "{}", r.history[3]);
    assert!(r.history[4].contains(r#""train/loss":NaN"#) && !r.history[4].contains("null"), "{}", r.history[4]);
    let config: Value = serde_json::from_str(r.upserts[0]["config"].as_str().unwrap()).unwrap();
    assert_eq!(config["model"]["value"]["hidden_size"], 64);
    assert_eq!(r.upserts[0]["project"], "test-project");
    assert!(r.upserts.iter().all(|u| u.get("tags").is_none()), "no tags set: none sent (an empty list would wipe the UI's)");
    let summary = unnan(r.summary.as_ref().unwrap());
    assert_eq!(summary["_step"], 19);
    assert_eq!(summary["best_val"], 1.25);
    assert_eq!(summary["train/grad_norm"], "NaN", "the last value of every key");
    assert!(summary["train/loss"].as_f64().unwrap() < 8.2);
    assert_eq!(summary["train/lr"], 1e-3, "W&B's sections: {summary}");
    assert!(summary["_wandb"]["runtime"].is_i64());
    assert_eq!(r.complete, Some(0));
    let mut uploaded = r.uploaded.clone();
    uploaded.sort();
    assert_eq!(uploaded, vec!["config.yaml", "training_curves.png", "wandb-metadata.json"]);
    assert_eq!(r.files["training_curves.png"], b"\x89PNG fake");
    let meta: Value = serde_json::from_slice(&r.files["wandb-metadata.json"]).unwrap();
    assert!(meta["os"].as_str().unwrap().starts_with("Linux-") && meta["host"].is_string() && meta["startedAt"].is_string(), "{meta}");
    assert!(meta["git"]["commit"].as_str().is_some_and(|c| c.len() == 40), "the project's commit: {meta}");
    let yaml: Value = serde_json::from_slice(&r.files["config.yaml"]).unwrap();
    assert_eq!(yaml["wandb_version"], 1);
    assert_eq!(yaml["train"]["value"]["lr"], 0.001);
    no_key_on_disk(d.path());
}

#[test]
fn server_errors_retry_after_and_outages_lose_nothing_and_duplicate_nothing() {
    let fake = Fake::start();
    let d = tempfile::tempdir().unwrap();
    let mut run = wandb::start(d.path(), settings(&fake.url, Mode::Online), &config(), None).unwrap();
    let id = run.id().unwrap().to_string();
    log_rows(&mut run, 0..10);
    std::thread::sleep(Duration::from_millis(300));
    // Three 500s, two 429s asking for a 1 s pause, then an outage of a second.
    fake.state.lock().unwrap().faults = vec![Fault::Status(500), Fault::Status(503), Fault::Status(500), Fault::RetryAfter(1), Fault::RetryAfter(1), Fault::Drop];
    log_rows(&mut run, 10..30);
    std::thread::sleep(Duration::from_millis(1500));
    fake.state.lock().unwrap().down_until = Some(Instant::now() + Duration::from_secs(1));
    log_rows(&mut run, 30..50);
    let report = run.finish(0).unwrap();
    assert!(report.complete && report.rows_only_local == 0, "{report:?}");
    assert_eq!(fake.violations(), Vec::<String>::new());
    let r = fake.run(&id);
    assert_eq!(steps_of(&r), (0..50).collect::<Vec<_>>(), "every row exactly once, in order");
    assert_eq!(r.complete, Some(0));
    assert!(fake.state.lock().unwrap().faults.is_empty(), "every fault was served");
}

#[test]
fn logging_never_waits_for_a_hanging_server() {
    let fake = Fake::start();
    let d = tempfile::tempdir().unwrap();
    let mut run = wandb::start(d.path(), settings(&fake.url, Mode::Online), &config(), None).unwrap();
    let id = run.id().unwrap().to_string();
    fake.state.lock().unwrap().hang = true; // every request now blocks inside the server
    log_rows(&mut run, 0..200); // returns although no request can complete
    assert!(fake.run(&id).history.is_empty());
    fake.state.lock().unwrap().hang = false;
    let report = run.finish(0).unwrap();
    assert!(report.complete, "{report:?}");
    assert_eq!(steps_of(&fake.run(&id)), (0..200).collect::<Vec<_>>());
}

#[test]
fn unauthorized_gives_up_with_a_message_and_keeps_the_spool() {
    let fake = Fake::start();
    let d = tempfile::tempdir().unwrap();
    let mut s = settings(&fake.url, Mode::Online);
    s.key = Some(wandb::ApiKey::new("wrong-key"));
    let mut run = wandb::start(d.path(), s.clone(), &config(), None).unwrap();
    log_rows(&mut run, 0..5);
    let report = run.finish(1).unwrap();
    assert_eq!(report, wandb::FinishReport { rows: 5, rows_sent: 0, rows_only_local: 5, complete: false });
    assert!(fake.run(run.id().unwrap()).history.is_empty());
    // The spool is intact: with the right key, sync uploads it, exit code included.
    let fixed = settings(&fake.url, Mode::Online);
    let synced = wandb::sync(d.path(), &fixed).unwrap();
    assert!(synced.complete && synced.rows_sent == 5);
    assert_eq!(fake.run(run.id().unwrap()).complete, Some(1));
    assert!(format!("{s:?}").contains("ApiKey(***)") && !format!("{s:?}").contains("wrong-key"), "Debug hides the key");
}

#[test]
fn offline_then_sync_sends_what_online_sends() {
    let fake = Fake::start();
    let online_dir = tempfile::tempdir().unwrap();
    let mut s = settings(&fake.url, Mode::Online);
    s.run_id = Some("onl1ne00".into());
    let mut run = wandb::start(online_dir.path(), s.clone(), &config(), None).unwrap();
    log_rows(&mut run, 0..25);
    run.finish(0).unwrap();

    let offline_dir = tempfile::tempdir().unwrap();
    let before = fake.state.lock().unwrap().requests;
    let mut s = settings(&fake.url, Mode::Offline);
    s.run_id = Some("offl1ne0".into());
    let mut run = wandb::start(offline_dir.path(), s.clone(), &config(), None).unwrap();
    log_rows(&mut run, 0..25);
    let report = run.finish(0).unwrap();
    assert_eq!(report.rows_only_local, 25);
    assert_eq!(fake.state.lock().unwrap().requests, before, "offline sends nothing");
    no_key_on_disk(offline_dir.path());

    let synced = wandb::sync(offline_dir.path(), &settings(&fake.url, Mode::Online)).unwrap();
    assert!(synced.complete && synced.rows_sent == 25);
    // Syncing again changes nothing on the server.
    wandb::sync(offline_dir.path(), &settings(&fake.url, Mode::Online)).unwrap();
    assert_eq!(fake.violations(), Vec::<String>::new());
    let (a, b) = (fake.run("onl1ne00"), fake.run("offl1ne0"));
    let strip = |l: &String| { let mut v = unnan(l); v.as_object_mut().unwrap().retain(|k, _| k != "_runtime" && k != "_timestamp"); v };
    assert_eq!(a.history.iter().map(strip).collect::<Vec<_>>(), b.history.iter().map(strip).collect::<Vec<_>>());
    let cfg = |r: &FakeRun| r.upserts[0]["config"].as_str().unwrap().to_string();
    assert_eq!(cfg(&a), cfg(&b));
    assert_eq!((a.complete, b.complete), (Some(0), Some(0)));
    let (mut ua, mut ub) = (a.uploaded.clone(), b.uploaded.clone());
    ua.sort();
    ub.sort();
    assert_eq!(ua, ub);
    let summary = |r: &FakeRun| { let mut v = unnan(r.summary.as_ref().unwrap()); v.as_object_mut().unwrap().retain(|k, _| !k.starts_with("_r") && k != "_timestamp" && k != "_wandb"); v };
    assert_eq!(summary(&a), summary(&b));
}

/// A skipped step logs its own row, and that step's log row follows: the server gets one line
/// with both (as the official client merges a step's rows), also when the uploader would have
/// sent the first row on its own before the second arrived, and from `sync`.
#[test]
fn rows_of_one_step_go_out_as_one_line() {
    let fake = Fake::start();
    let log = |run: &mut wandb::Run| {
        log_rows(run, 0..2);
        run.log(Row::from_json(&json!({"step": 2, "skipped": true, "skipped_steps": 1}))).unwrap();
        std::thread::sleep(Duration::from_millis(400)); // several upload intervals
        run.log(Row::from_json(&json!({"step": 2, "train": {"loss": 5.0}}))).unwrap();
        log_rows(run, 3..4);
        std::thread::sleep(Duration::from_millis(400));
    };
    let check = |r: &FakeRun| {
        assert_eq!(steps_of(r), vec![0, 1, 2, 3]);
        let row = unnan(&r.history[2]);
        assert_eq!((row["train/skipped"].as_bool(), row["train/skipped_steps"].as_i64(), row["train/loss"].as_f64()), (Some(true), Some(1), Some(5.0)), "{row}");
    };
    let d = tempfile::tempdir().unwrap();
    let mut s = settings(&fake.url, Mode::Online);
    s.run_id = Some("merged00".into());
    let mut run = wandb::start(d.path(), s, &config(), None).unwrap();
    log(&mut run);
    assert_eq!(run.finish(0).unwrap(), wandb::FinishReport { rows: 4, rows_sent: 4, rows_only_local: 0, complete: true });
    check(&fake.run("merged00"));

    let d = tempfile::tempdir().unwrap();
    let mut s = settings(&fake.url, Mode::Offline);
    s.run_id = Some("merged01".into());
    let mut run = wandb::start(d.path(), s, &config(), None).unwrap();
    log(&mut run);
    run.finish(0).unwrap();
    assert_eq!(wandb::sync(d.path(), &settings(&fake.url, Mode::Online)).unwrap().rows_sent, 4);
    check(&fake.run("merged01"));
    assert_eq!(fake.violations(), Vec::<String>::new());
}

/// SIGTERM: the run is marked preempting (as the official client's `mark_preempting`), then ends
/// with exit code 143, so W&B does not show it as crashed.
#[test]
fn a_preempted_run_is_marked_preempting_then_failed_with_143() {
    let fake = Fake::start();
    let d = tempfile::tempdir().unwrap();
    let mut run = wandb::start(d.path(), settings(&fake.url, Mode::Online), &config(), None).unwrap();
    let id = run.id().unwrap().to_string();
    log_rows(&mut run, 0..3);
    run.mark_preempting().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fake.run(&id).preempting && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(fake.run(&id).preempting, "preempting is sent at once, before the finish");
    assert!(run.finish(143).unwrap().complete);
    let r = fake.run(&id);
    assert_eq!((r.complete, steps_of(&r)), (Some(143), vec![0, 1, 2]));
    // Resumed by the next process (same run directory, same spool): the earlier process's finish
    // is not this one's; the run goes on and completes with 0.
    let mut run = wandb::start(d.path(), settings(&fake.url, Mode::Online), &config(), Some(&id)).unwrap();
    log_rows(&mut run, 3..6);
    let report = run.finish(0).unwrap();
    assert!(report.complete && report.rows_only_local == 0, "{report:?}");
    let r = fake.run(&id);
    assert_eq!((r.complete, steps_of(&r)), (Some(0), vec![0, 1, 2, 3, 4, 5]));
    assert_eq!(fake.violations(), Vec::<String>::new());
}

/// The Stop button: W&B answers file_stream with `"stopped": true`; the run reports it, and the
/// training loop's question (`helpers::stop::requested`) says to stop after this step.
#[test]
fn the_stop_button_reaches_the_training_loop() {
    let fake = Fake::start();
    let d = tempfile::tempdir().unwrap();
    let mut run = wandb::start(d.path(), settings(&fake.url, Mode::Online), &config(), None).unwrap();
    let single = helpers::dist::Dist::single();
    log_rows(&mut run, 0..2);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!run.stopped());
    assert_eq!(helpers::stop::requested(&single, run.stopped()).unwrap(), None);
    fake.state.lock().unwrap().stop_pressed = true;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut step = 2;
    while !run.stopped() && Instant::now() < deadline {
        log_rows(&mut run, step..step + 1); // steps go on; each batch's answer can carry the stop
        step += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(helpers::stop::requested(&single, run.stopped()).unwrap(), Some(helpers::stop::Stop::StoppedInUi));
    assert!(run.finish(helpers::stop::Stop::StoppedInUi.exit_code()).unwrap().complete);
    assert_eq!(fake.run(run.id().unwrap()).complete, Some(0));
}

#[test]
fn a_resumed_run_continues_the_same_history() {
    let fake = Fake::start();
    let d = tempfile::tempdir().unwrap();
    let mut run = wandb::start(d.path(), settings(&fake.url, Mode::Online), &config(), None).unwrap();
    let id = run.id().unwrap().to_string();
    log_rows(&mut run, 0..11);
    drop(run); // a crash: no finish
    std::thread::sleep(Duration::from_millis(500));
    // Resumed from a checkpoint at step 8: steps 9 and 10 are logged again, with the same values.
    let mut run = wandb::start(d.path(), settings(&fake.url, Mode::Online), &config(), Some(&id)).unwrap();
    assert_eq!(run.id(), Some(id.as_str()));
    log_rows(&mut run, 9..16);
    let report = run.finish(0).unwrap();
    assert!(report.complete && report.rows_only_local == 0, "{report:?}");
    assert_eq!(fake.violations(), Vec::<String>::new());
    let r = fake.run(&id);
    assert_eq!(steps_of(&r), (0..16).collect::<Vec<_>>());
    assert_eq!(r.upserts.len(), 2, "the resumed process upserts the same run");
    assert_eq!(r.complete, Some(0));
}

#[test]
fn a_new_run_with_an_existing_id_continues_after_its_lines() {
    let fake = Fake::start();
    let with_id = || {
        let mut s = settings(&fake.url, Mode::Online);
        s.run_id = Some("reused01".into());
        s
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut run = wandb::start(d1.path(), with_id(), &config(), None).unwrap();
    log_rows(&mut run, 0..3);
    assert!(run.finish(0).unwrap().complete);
    let first = fake.run("reused01").history;
    // Another process, not a resume, with the same WANDB_RUN_ID.
    let mut run = wandb::start(d2.path(), with_id(), &config(), None).unwrap();
    log_rows(&mut run, 0..2);
    assert!(run.finish(0).unwrap().complete);
    assert_eq!(fake.violations(), Vec::<String>::new(), "its history starts at the server's line count");
    let r = fake.run("reused01");
    assert_eq!(r.history.len(), 5);
    assert_eq!(r.history[..3], first[..], "the first run's lines are kept");
}

#[test]
fn storage_refusals_skip_the_file_and_never_stop_the_metrics() {
    let fake = Fake::start();
    // The storage refuses one file for good (403) and another twice for a while (408, then 503).
    fake.state.lock().unwrap().upload_faults = [("refused.png".to_string(), vec![403]), ("slow.png".to_string(), vec![408, 503])].into_iter().collect();
    let d = tempfile::tempdir().unwrap();
    let mut run = wandb::start(d.path(), settings(&fake.url, Mode::Online), &config(), None).unwrap();
    let id = run.id().unwrap().to_string();
    for name in ["refused.png", "slow.png"] {
        let p = d.path().join(name);
        std::fs::write(&p, name.as_bytes()).unwrap();
        run.save_file(&p).unwrap();
    }
    log_rows(&mut run, 0..10);
    let report = run.finish(0).unwrap();
    assert!(report.complete && report.rows_sent == 10, "{report:?}");
    assert_eq!(fake.violations(), Vec::<String>::new());
    let r = fake.run(&id);
    assert_eq!(steps_of(&r), (0..10).collect::<Vec<_>>(), "every row arrived");
    let mut uploaded = r.uploaded.clone();
    uploaded.sort();
    assert_eq!(uploaded, vec!["config.yaml", "slow.png", "wandb-metadata.json"], "the refused file is skipped, the slow one retried");
    assert_eq!(r.files["slow.png"], b"slow.png");
    assert!(fake.state.lock().unwrap().upload_faults.values().all(|f| f.is_empty()));
}

#[test]
fn settings_read_environment_then_secrets_env_then_netrc() {
    let d = tempfile::tempdir().unwrap();
    std::env::remove_var("WANDB_API_KEY");
    std::env::remove_var("WANDB_MODE");
    std::env::set_var("HOME", d.path());
    let s = Settings::from_env(d.path(), "p").unwrap();
    assert_eq!(s.mode, Mode::Disabled, "no key: disabled");
    std::fs::write(d.path().join(".netrc"), "machine api.wandb.ai\n  login user\n  password netrckey\n").unwrap();
    let s = Settings::from_env(d.path(), "p").unwrap();
    assert_eq!((s.mode, s.key), (Mode::Online, Some(wandb::ApiKey::new("netrckey"))));
    std::fs::write(d.path().join("secrets.env"), "# comment\nexport WANDB_API_KEY=\"filekey\"\nWANDB_PROJECT=from-file\nWANDB_TAGS=a, b\n").unwrap();
    let s = Settings::from_env(d.path(), "p").unwrap();
    assert_eq!(s.key, Some(wandb::ApiKey::new("filekey")));
    assert_eq!((s.project.as_str(), s.tags.clone()), ("from-file", vec!["a".to_string(), "b".to_string()]));
    assert_eq!(s.app_url, "https://wandb.ai");
    std::fs::write(d.path().join("secrets.env"), "WANDB_MODE=offline\n").unwrap();
    assert_eq!(Settings::from_env(d.path(), "p").unwrap().mode, Mode::Offline);
    std::fs::write(d.path().join("secrets.env"), "WANDB_MODE=sideways\nWANDB_PROJECT=from-file\n").unwrap();
    // The environment wins over the file (a sweep's WANDB_NAME, a one-off WANDB_MODE).
    std::env::set_var("WANDB_MODE", "disabled");
    std::env::set_var("WANDB_PROJECT", "from-env");
    let s = Settings::from_env(d.path(), "p").unwrap();
    std::env::remove_var("WANDB_MODE");
    std::env::remove_var("WANDB_PROJECT");
    assert_eq!((s.mode, s.project.as_str()), (Mode::Disabled, "from-env"));
    assert!(Settings::from_env(d.path(), "p").unwrap_err().to_string().contains("online, offline or disabled"));
    let disabled = wandb::start(d.path(), Settings { mode: Mode::Disabled, ..settings("http://127.0.0.1:9", Mode::Disabled) }, &config(), None).unwrap();
    assert_eq!(disabled.id(), None);
    assert!(!d.path().join("wandb").exists(), "disabled writes nothing");
}

#[test]
fn images_are_logged_as_media_in_history() {
    let fake = Fake::start();
    let d = tempfile::tempdir().unwrap();
    let mut run = wandb::start(d.path(), settings(&fake.url, Mode::Online), &config(), None).unwrap();
    let id = run.id().unwrap().to_string();
    let png = d.path().join("usage.png");
    image::RgbaImage::from_pixel(30, 20, image::Rgba([255, 0, 0, 255])).save(&png).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    run.log(Row::new().with("step", 7i64).with("val.loss", 2.5)).unwrap();
    run.log_image("routing.usage", &png, 7).unwrap();
    assert!(run.log_image("routing.bad", &d.path().join("nope.png"), 7).is_err());
    std::fs::write(d.path().join("fake.png"), b"not a png").unwrap();
    assert!(run.log_image("routing.bad", &d.path().join("fake.png"), 7).unwrap_err().to_string().contains("is not a PNG"));
    run.finish(0).unwrap();

    let r = fake.run(&id);
    assert_eq!(r.history.len(), 1, "the image joins its step's line: {:?}", r.history);
    let line: Value = serde_json::from_str(&r.history[0]).unwrap();
    let img = &line["routing/usage"];
    let sha = {
        use sha2::Digest;
        sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(img["_type"], "image-file");
    assert_eq!(img["path"], format!("media/images/routing_usage_7_{}.png", &sha[..20]));
    assert_eq!((img["width"].as_u64(), img["height"].as_u64(), img["size"].as_u64()), (Some(30), Some(20), Some(bytes.len() as u64)));
    assert_eq!(img["sha256"], sha);
    assert_eq!(line["val/loss"], 2.5);
    let name = img["path"].as_str().unwrap();
    assert_eq!(r.files[name], bytes, "the file itself is uploaded under its media path");
    assert!(r.uploaded.iter().any(|u| u == name));
}

#[test]
fn per_expert_usage_goes_up_as_one_heatmap_not_scalar_panels() {
    let fake = Fake::start();
    let d = tempfile::tempdir().unwrap();
    let mut run = wandb::start(d.path(), settings(&fake.url, Mode::Online), &config(), None).unwrap();
    let id = run.id().unwrap().to_string();
    let mut row = Row::new().with("step", 10i64).with("train.loss", 3.0);
    for l in 0..2 {
        for e in 0..4 {
            row = row.with(&format!("expert_usage.{l}.{e}"), 0.25);
        }
    }
    run.log(row).unwrap();
    run.log(Row::new().with("step", 11i64).with("train.loss", 2.9)).unwrap();
    run.finish(0).unwrap();

    let r = fake.run(&id);
    let first: Value = serde_json::from_str(&r.history[0]).unwrap();
    assert!(first.as_object().unwrap().keys().all(|k| !k.starts_with("expert_usage/")), "no scalar per expert: {first}");
    let img = &first["expert_usage"];
    assert_eq!(img["_type"], "image-file", "{first}");
    let png = &r.files[img["path"].as_str().unwrap()];
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(first["train/loss"], 3.0);
    let second: Value = serde_json::from_str(&r.history[1]).unwrap();
    assert!(second.get("expert_usage").is_none(), "a row without usage has no image");
}

#[test]
fn system_metrics_go_up_as_events_lines() {
    let fake = Fake::start();
    let d = tempfile::tempdir().unwrap();
    let mut s = settings(&fake.url, Mode::Online);
    s.system_every = Some(Duration::from_millis(150));
    let mut run = wandb::start(d.path(), s, &config(), None).unwrap();
    let id = run.id().unwrap().to_string();
    for step in 0..8i64 {
        run.log(Row::new().with("step", step).with("train.loss", 1.0)).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    run.finish(0).unwrap();

    assert_eq!(fake.violations(), Vec::<String>::new(), "events offsets contiguous");
    let r = fake.run(&id);
    assert!(r.events.len() >= 2, "{} system samples in 1.2 s at 0.15 s", r.events.len());
    for line in &r.events {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["_wandb"], true);
        assert!(v["_timestamp"].is_f64() && v["_runtime"].is_f64(), "{line}");
        assert!((0.0..=100.0).contains(&v["system.cpu"].as_f64().unwrap()), "{line}");
        assert!(v["system.memory"].is_f64() && v["system.proc.memory.rssMB"].as_f64().unwrap() > 0.0, "{line}");
    }
    assert!(r.history.iter().all(|h| !h.contains("system.")), "system metrics stay out of the history");
}

#[test]
fn the_system_sampling_interval_is_read_from_the_environment() {
    // Only values every other test here can live with (tests share the process environment).
    let d = tempfile::tempdir().unwrap();
    std::env::set_var("WANDB_X_STATS_SAMPLING_INTERVAL", "0");
    assert_eq!(Settings::from_env(d.path(), "p").unwrap().system_every, None, "0 turns it off");
    std::env::set_var("WANDB_X_STATS_SAMPLING_INTERVAL", "2.5");
    assert_eq!(Settings::from_env(d.path(), "p").unwrap().system_every, Some(Duration::from_millis(2500)));
    std::env::remove_var("WANDB_X_STATS_SAMPLING_INTERVAL");
    assert_eq!(Settings::from_env(d.path(), "p").unwrap().system_every, Some(Duration::from_secs(15)));
}
