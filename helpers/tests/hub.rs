//! `hf::resolve` against a fake Hugging Face hub on 127.0.0.1 that speaks the resolve protocol the
//! real client uses: `GET /{repo}/resolve/{rev}/{file}` with `Range: bytes=0-0` for metadata
//! (`ETag`, `X-Repo-Commit`, `Content-Range`), then a ranged GET for the bytes; 404 for absent files.
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

mod common;
use common::serve;

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
    let hub = serve(HashMap::from([("test-org/tiny-olmoe".to_string(), files.clone())]));
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
    assert!(reqs.iter().all(|r| r.auth.as_deref() == Some("Bearer hf_test_token")), "{reqs:?}");
    assert!(reqs.iter().any(|r| r.path == "/test-org/tiny-olmoe/resolve/main/model.safetensors"), "{reqs:?}");

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
