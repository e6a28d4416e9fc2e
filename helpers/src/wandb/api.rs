//! W&B's HTTP API on reqwest: GraphQL (`UpsertBucket`, `RunResumeStatus`, `CreateRunFiles`),
//! `file_stream`, and uploads to pre-signed URLs (which never get the key). Every failure is
//! classified: transient (retry: 429, 5xx, connection errors, with `Retry-After`) or fatal.
use serde_json::{json, Value};
use std::time::Duration;

/// The API key. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq)]
pub struct ApiKey(pub(crate) String);

impl ApiKey {
    pub fn new(key: &str) -> Self {
        Self(key.trim().to_string())
    }
}
impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey(***)")
    }
}

/// Why a request did not succeed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Worth retrying; `retry_after` is the server's `Retry-After`.
    Transient { what: String, retry_after: Option<Duration> },
    /// Retrying cannot help (bad key, bad request, missing project...).
    Fatal { status: u16, what: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transient { what, .. } => write!(f, "{what}"),
            Self::Fatal { what, .. } => write!(f, "{what}"),
        }
    }
}

pub struct Client {
    http: reqwest::blocking::Client,
    /// Uploads go to other hosts: a separate client that never carries default auth.
    upload: reqwest::blocking::Client,
    pub base_url: String,
    key: ApiKey,
}

const UPSERT_BUCKET: &str = "mutation UpsertBucket($id: String, $name: String, $project: String, $entity: String, $groupName: String, $description: String, $displayName: String, $notes: String, $commit: String, $config: JSONString, $host: String, $debug: Boolean, $program: String, $repo: String, $jobType: String, $state: String, $sweep: String, $tags: [String!], $summaryMetrics: JSONString) { upsertBucket(input: {id: $id, name: $name, groupName: $groupName, modelName: $project, entityName: $entity, description: $description, displayName: $displayName, notes: $notes, config: $config, commit: $commit, host: $host, debug: $debug, jobProgram: $program, jobRepo: $repo, jobType: $jobType, state: $state, sweep: $sweep, tags: $tags, summaryMetrics: $summaryMetrics}) { bucket { id name displayName description config sweepName project { id name entity { id name } } historyLineCount } inserted } }";
const RUN_RESUME_STATUS: &str = "query RunResumeStatus($project: String, $entity: String, $name: String!) { model(name: $project, entityName: $entity) { id name entity { id name } bucket(name: $name, missingOk: true) { id name summaryMetrics displayName logLineCount historyLineCount eventsLineCount historyTail eventsTail config tags } } }";
const CREATE_RUN_FILES: &str = "mutation CreateRunFiles($entity: String!, $project: String!, $run: String!, $files: [String!]!) { createRunFiles(input: {entityName: $entity, projectName: $project, runName: $run, files: $files}) { runID uploadHeaders files { name uploadUrl } } }";

impl Client {
    pub fn new(base_url: &str, key: ApiKey, timeout: Duration) -> Self {
        let build = || reqwest::blocking::Client::builder().timeout(timeout).user_agent("moe-research-kernel-wandb/0.1").build().expect("reqwest client");
        Self { http: build(), upload: build(), base_url: base_url.trim_end_matches('/').to_string(), key }
    }

    fn post_json(&self, url: &str, body: String) -> Result<Value, Failure> {
        let resp = self
            .http
            .post(url)
            .basic_auth("api", Some(&self.key.0))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .map_err(|e| Failure::Transient { what: format!("cannot reach {url}: {}", without_url(&e)), retry_after: None })?;
        let status = resp.status().as_u16();
        let retry_after = retry_after(&resp);
        let text = resp.text().unwrap_or_default();
        if status == 200 {
            return serde_json::from_str(&text).or_else(|_| Ok(Value::Null));
        }
        Err(classify(status, retry_after, url, &text))
    }

    /// A GraphQL call; returns `data`. Errors reported with HTTP 200 are fatal.
    pub fn graphql(&self, operation: &str, query: &str, variables: Value) -> Result<Value, Failure> {
        let body = json!({ "query": query, "variables": variables, "operationName": operation }).to_string();
        let v = self.post_json(&format!("{}/graphql", self.base_url), body)?;
        if let Some(errs) = v.get("errors").filter(|e| !e.is_null()) {
            return Err(Failure::Fatal { status: 200, what: format!("W&B {operation} failed: {errs}") });
        }
        Ok(v.get("data").cloned().unwrap_or(Value::Null))
    }

    pub fn upsert_bucket(&self, vars: Value) -> Result<Value, Failure> {
        self.graphql("UpsertBucket", UPSERT_BUCKET, vars)
    }

    pub fn run_resume_status(&self, entity: &str, project: &str, run: &str) -> Result<Value, Failure> {
        self.graphql("RunResumeStatus", RUN_RESUME_STATUS, json!({ "entity": entity, "project": project, "name": run }))
    }

    pub fn create_run_files(&self, entity: &str, project: &str, run: &str, files: &[String]) -> Result<Value, Failure> {
        self.graphql("CreateRunFiles", CREATE_RUN_FILES, json!({ "entity": entity, "project": project, "run": run, "files": files }))
    }

    /// `POST {base}/files/{entity}/{project}/{run}/file_stream` with a prepared body.
    pub fn file_stream(&self, entity: &str, project: &str, run: &str, body: String) -> Result<Value, Failure> {
        self.post_json(&format!("{}/files/{entity}/{project}/{run}/file_stream", self.base_url), body)
    }

    /// PUT to a pre-signed URL with the headers W&B returned, and no W&B credentials.
    pub fn upload(&self, url: &str, headers: &[String], bytes: Vec<u8>) -> Result<(), Failure> {
        let mut req = self.upload.put(url).body(bytes);
        for h in headers {
            if let Some((k, v)) = h.split_once(':') {
                req = req.header(k.trim(), v.trim());
            }
        }
        let resp = req.send().map_err(|e| Failure::Transient { what: format!("cannot upload a file: {}", without_url(&e)), retry_after: None })?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let retry_after = retry_after(&resp);
        match status {
            // The storage's own refusal (an expired or bad pre-signed URL), not W&B's of the API key.
            401 | 403 => Err(Failure::Fatal { status, what: format!("the storage refused the upload URL W&B gave (HTTP {status})") }),
            _ => Err(classify(status, retry_after, "the file upload URL", &resp.text().unwrap_or_default())),
        }
    }
}

/// The `Retry-After` header in seconds (W&B sends seconds, not an HTTP date).
fn retry_after(resp: &reqwest::blocking::Response) -> Option<Duration> {
    resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|s| s.trim().parse::<f64>().ok()).map(Duration::from_secs_f64)
}

/// reqwest's error text without the URL (a pre-signed upload URL carries a credential of its own).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() { "timed out" } else if e.is_connect() { "connection failed" } else { "request failed" };
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = String::new();
    while let Some(s) = src {
        last = s.to_string();
        src = s.source();
    }
    if last.is_empty() { kind.to_string() } else { format!("{kind} ({last})") }
}

fn classify(status: u16, retry_after: Option<Duration>, what: &str, body: &str) -> Failure {
    let body: String = body.chars().take(200).collect();
    match status {
        // Worth retrying, as the official client does: timeout, conflict, rate limit, server errors.
        408 | 409 | 429 | 500..=599 if status != 501 => Failure::Transient { what: format!("{what} answered HTTP {status}"), retry_after },
        401 | 403 => Failure::Fatal { status, what: format!("W&B refused the API key (HTTP {status} from {what}); check WANDB_API_KEY in secrets.env, the environment or ~/.netrc") },
        _ => Failure::Fatal { status, what: format!("{what} answered HTTP {status}: {body}") },
    }
}
