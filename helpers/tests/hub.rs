//! `hf::resolve` against a fake Hugging Face hub on 127.0.0.1 that speaks the resolve protocol the
//! real client uses: `GET /{repo}/resolve/{rev}/{file}` with `Range: bytes=0-0` for metadata
//! (`ETag`, `X-Repo-Commit`, `Content-Range`), then a ranged GET for the bytes; 404 for absent files.
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

struct FakeHub {
    url: String,
    /// (path, authorization header) of every request.
    requests: Arc<Mutex<Vec<(String, Option<String>)>>>,
}

fn serve(files: HashMap<String, Vec<u8>>) -> FakeHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(200) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let (mut range, mut auth) = (None, None);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap_or((&h, ""));
                match k.to_ascii_lowercase().as_str() {
                    "range" => range = Some(v.trim().to_string()),
                    "authorization" => auth = Some(v.trim().to_string()),
                    _ => {}
                }
            }
            log.lock().unwrap().push((path.clone(), auth));
            // /{owner}/{name}/resolve/{rev}/{file}
            let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
            let ours = parts.len() == 5 && parts[..3] == ["test-org", "tiny-olmoe", "resolve"];
            let body = ours.then(|| files.get(parts[4])).flatten();
            let Some(body) = body else {
                let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                continue;
            };
            let start: usize = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let end = if range.as_deref() == Some("bytes=0-0") { 1.min(body.len()) } else { body.len() };
            let chunk = &body[start.min(end)..end];
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nETag: \"{:016x}{}\"\r\nX-Repo-Commit: {}\r\nConnection: close\r\n\r\n",
                chunk.len(), start, end.saturating_sub(1), body.len(), body.len(), parts[4].len(), "0123456789abcdef0123456789abcdef01234567"
            );
            let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(chunk));
        }
    });
    FakeHub { url, requests }
}

fn checkpoint_bytes(dir: &Path) -> HashMap<String, Vec<u8>> {
    let w = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]);
    Tensor::write_safetensors(&[("model.norm.weight", &w)], dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), b"{\"model_type\": \"olmoe\"}").unwrap();
    ["config.json", "model.safetensors"].iter().map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap())).collect()
}

/// One test, because it sets process-wide environment variables.
#[test]
fn downloads_through_hf_hub_then_works_offline() {
    let src = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let files = checkpoint_bytes(src.path());
    let hub = serve(files.clone());
    std::env::set_var("HF_ENDPOINT", &hub.url);
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_TOKEN", "hf_test_token");
    std::env::remove_var("HF_HUB_OFFLINE");

    // A local directory is used as it is.
    assert_eq!(helpers::hf::resolve(src.path().to_str().unwrap()).unwrap(), src.path());

    let dir = helpers::hf::resolve("test-org/tiny-olmoe").unwrap();
    assert!(dir.starts_with(home.path()), "{} is not in the hub cache", dir.display());
    for (name, bytes) in &files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name} differs");
    }
    let reqs = hub.requests.lock().unwrap().clone();
    assert!(reqs.iter().all(|(_, a)| a.as_deref() == Some("Bearer hf_test_token")), "{reqs:?}");
    assert!(reqs.iter().any(|(p, _)| p == "/test-org/tiny-olmoe/resolve/main/model.safetensors"), "{reqs:?}");

    // A repository without weights is a clear error naming what is missing.
    let e = helpers::hf::resolve("test-org/other@v1").unwrap_err().to_string();
    assert!(e.contains("test-org/other@v1: config.json not found on the hub"), "{e}");

    // Offline: the cached copy, without a single request; an uncached repo says what to do.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let n = hub.requests.lock().unwrap().len();
    assert_eq!(helpers::hf::resolve("test-org/tiny-olmoe").unwrap(), dir);
    assert_eq!(hub.requests.lock().unwrap().len(), n, "offline mode must not touch the network");
    let e = helpers::hf::resolve("test-org/never-downloaded").unwrap_err().to_string();
    assert!(e.contains("HF_HUB_OFFLINE=1"), "{e}");
    assert!(helpers::hf::resolve("not a hub id").unwrap_err().to_string().contains("neither an existing directory"));
    std::env::remove_var("HF_HUB_OFFLINE");
}
