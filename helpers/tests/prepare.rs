//! Pretraining data from nothing to shards: a FineWeb-Edu-shaped dataset downloaded through the
//! real hf-hub client from a fake hub on 127.0.0.1 (file list, interrupted download that resumes,
//! offline mode), then processed into shards (filters, validation split, skip / redo on rerun,
//! one-line errors), then loaded for training.
use helpers::prepare::{self, Filter, Process};
use helpers::shards::{self, Loader, Shard};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;
use common::{serve, write_parquet};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn tokenizer() -> PathBuf {
    root().join(helpers::data::DEFAULT_TOKENIZER)
}

/// 40 documents: language alternates en / fr every 4, score = i / 10.
fn rows() -> Vec<(String, &'static str, f64)> {
    (0..40)
        .map(|i| {
            (
                format!("Document {i}: the quick brown fox {} jumps over the lazy dog.", "very ".repeat(i % 7)),
                if (i / 4) % 2 == 0 { "en" } else { "fr" },
                i as f64 / 10.0,
            )
        })
        .collect()
}

fn parquet(path: &Path, rows: &[(String, &'static str, f64)]) {
    let r: Vec<(&str, &str, f64)> = rows.iter().map(|(t, l, s)| (t.as_str(), *l, *s)).collect();
    write_parquet(path, &r, 16); // 3 row groups
}

/// The shard's documents as token id lists (EOS included).
fn docs_of(shard: &Shard) -> Vec<Vec<i64>> {
    let ends = shard.doc_ends();
    let all = shard.tokens(0, shard.n_tokens as usize);
    let mut start = 0;
    ends.iter()
        .map(|&e| {
            let d = all[start..e as usize].to_vec();
            start = e as usize;
            d
        })
        .collect()
}

fn encode(tok: &helpers::Tokenizer, text: &str) -> Vec<i64> {
    let mut ids = tok.encode(text).unwrap();
    ids.push(tok.eos_id);
    ids
}

/// One test: it sets process-wide environment variables.
#[test]
fn downloads_a_dataset_with_resume_and_offline_mode() {
    let src = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let rows = rows();
    parquet(&src.path().join("a.parquet"), &rows[..20]);
    parquet(&src.path().join("b.parquet"), &rows[20..]);
    let files: HashMap<String, Vec<u8>> =
        [("sample/10BT/000_00000.parquet", "a.parquet"), ("sample/10BT/001_00000.parquet", "b.parquet"), ("README.md", "a.parquet")]
            .iter()
            .map(|(k, f)| (k.to_string(), std::fs::read(src.path().join(f)).unwrap()))
            .collect();
    let hub = serve(HashMap::from([("datasets/test-org/tiny-web".to_string(), files.clone())]));
    std::env::set_var("HF_ENDPOINT", &hub.url);
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_TOKEN", "hf_data_token");
    std::env::remove_var("HF_HUB_OFFLINE");

    // The first file's transfer breaks after 100 bytes, with no retries: an error, a .part left.
    hub.cut_after.store(100, std::sync::atomic::Ordering::SeqCst);
    let e = prepare::download_with_retries("test-org/tiny-web", "sample/10BT/*.parquet", Some(1), 0).unwrap_err().to_string();
    assert!(e.contains("sample/10BT/000_00000.parquet") && e.contains("run again to resume"), "{e}");
    let part: Vec<PathBuf> = walk(home.path()).into_iter().filter(|p| p.extension().is_some_and(|x| x == "part")).collect();
    assert_eq!(part.len(), 1, "one partial file expected");
    assert_eq!(std::fs::metadata(&part[0]).unwrap().len(), 100);

    // Run again: it resumes at byte 100 (a ranged request), then fetches the second file.
    let n_before = hub.requests.lock().unwrap().len();
    let paths = prepare::download("test-org/tiny-web", "sample/10BT/*.parquet", None).unwrap();
    assert_eq!(paths.len(), 2, "README.md must not match");
    assert_eq!(std::fs::read(&paths[0]).unwrap(), files["sample/10BT/000_00000.parquet"]);
    assert_eq!(std::fs::read(&paths[1]).unwrap(), files["sample/10BT/001_00000.parquet"]);
    let reqs = hub.requests.lock().unwrap().clone();
    assert!(reqs[n_before..].iter().any(|r| r.path.ends_with("000_00000.parquet") && r.range.as_deref() == Some("bytes=100-")), "{reqs:?}");
    assert!(reqs.iter().all(|r| r.auth.as_deref() == Some("Bearer hf_data_token")), "HF_TOKEN not sent: {reqs:?}");
    assert!(reqs.iter().any(|r| r.path.starts_with("/api/datasets/test-org/tiny-web/revision/main")), "{reqs:?}");

    // Nothing matching is a clear error; offline mode lists and returns the cache without a request.
    let e = prepare::download("test-org/tiny-web", "sample/350BT/*.parquet", None).unwrap_err().to_string();
    assert!(e.contains("no file of dataset test-org/tiny-web matches \"sample/350BT/*.parquet\" on the hub"), "{e}");
    let n = hub.requests.lock().unwrap().len();
    assert_eq!(prepare::cached("test-org/tiny-web", "sample/10BT/*.parquet", Some(1)).unwrap(), paths[..1]);
    assert_eq!(hub.requests.lock().unwrap().len(), n, "cached() must not touch the network");
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_eq!(prepare::download("test-org/tiny-web", "sample/10BT/*.parquet", None).unwrap(), paths);
    assert_eq!(hub.requests.lock().unwrap().len(), n, "offline mode must not touch the network");
    let e = prepare::download("test-org/never", "*.parquet", None).unwrap_err().to_string();
    assert!(e.contains("HF_HUB_OFFLINE=1"), "{e}");
    std::env::remove_var("HF_HUB_OFFLINE");

    // The downloaded files go on to shards.
    let out = tempfile::tempdir().unwrap();
    let mut job = Process::new(paths, out.path(), tokenizer());
    job.progress = false;
    job.val_tokens = 1;
    let sum = job.run().unwrap();
    assert_eq!((sum.files, sum.docs_read, sum.docs_kept), (2, 40, 40));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

#[test]
fn processes_parquet_and_jsonl_into_shards_with_filters_and_a_validation_split() {
    let dir = tempfile::tempdir().unwrap();
    let rows = rows();
    let inputs = dir.path().join("in");
    std::fs::create_dir_all(inputs.join("sub")).unwrap();
    parquet(&inputs.join("a.parquet"), &rows[..24]);
    let jsonl: String = rows[24..].iter().map(|(t, l, s)| serde_json::json!({"text": t, "language": l, "score": s}).to_string() + "\n").collect();
    std::fs::write(inputs.join("sub/b.jsonl"), jsonl).unwrap();
    let tok = helpers::Tokenizer::from_file(tokenizer()).unwrap();

    let out = dir.path().join("shards");
    let mut job = Process::new(vec![inputs.clone()], &out, tokenizer());
    job.progress = false;
    job.batch_docs = 5; // several tokenizer calls per row group
    job.filter = Filter { language: Some("en".into()), min_score: Some(0.5) };
    job.val_tokens = 30; // the first kept documents (~20 tokens each) until >= 30 tokens
    let sum = job.run().unwrap();
    let kept: Vec<&String> = rows.iter().filter(|(_, l, s)| *l == "en" && *s >= 0.5).map(|r| &r.0).collect();
    assert_eq!((sum.files, sum.docs_read, sum.docs_kept as usize), (2, 40, kept.len()));

    let val = Shard::open(&out.join("val/val.bin"), None).unwrap();
    let train = shards::open_dir(&out.join("train"), None).unwrap();
    assert_eq!(train.len(), 2);
    assert!(train[0].path.ends_with("00000-a.bin") && train[1].path.ends_with("00001-b.bin"));
    assert_eq!(val.dtype, 2, "OLMoE's 50,280 ids fit in u16");
    let got: Vec<Vec<i64>> = [&val, &train[0], &train[1]].iter().flat_map(|s| docs_of(s)).collect();
    let want: Vec<Vec<i64>> = kept.iter().map(|t| encode(&tok, t)).collect();
    assert_eq!(got, want, "shards must hold the kept documents in order, each followed by EOS");
    assert_eq!(val.n_docs, 2, "validation = the first documents up to 30 tokens");
    assert_eq!(val.tokenizer, shards::fnv1a(&std::fs::read(tokenizer()).unwrap()));

    // A rerun skips both shards and rewrites nothing.
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let before = mtime(&train[1].path);
    let again = job.run().unwrap();
    assert_eq!((again.skipped_files, again.docs_read), (2, 0));
    assert_eq!(mtime(&train[1].path), before);

    // A crash mid-shard leaves only a .tmp: the rerun redoes that shard; a truncated one too.
    let b_bytes = std::fs::read(&train[1].path).unwrap();
    std::fs::rename(&train[1].path, train[1].path.with_extension("tmp")).unwrap();
    let a_bytes = std::fs::read(&train[0].path).unwrap();
    std::fs::write(&train[0].path, &a_bytes[..a_bytes.len() - 3]).unwrap();
    let redo = job.run().unwrap();
    assert_eq!(redo.skipped_files, 0);
    assert_eq!(std::fs::read(&train[1].path).unwrap(), b_bytes);
    assert_eq!(std::fs::read(&train[0].path).unwrap(), a_bytes);
    assert!(!train[1].path.with_extension("tmp").exists());

    // New settings into the same directory are refused, naming what differs.
    let mut other = job.clone();
    other.filter.min_score = None;
    let e = other.run().unwrap_err().to_string();
    assert!(e.contains("other settings") && e.contains("min_score"), "{e}");

    // The shards feed the training loader; a tokenizer that does not match is refused.
    let loader = Loader::new(shards::open_dir(&out.join("train"), Some(val.tokenizer)).unwrap(), 8, 7).unwrap();
    let (x, y) = loader.batch(0, 2, 0, 1);
    assert_eq!(x.size(), [2, 8]);
    assert_eq!(x.narrow(1, 1, 7), y.narrow(1, 0, 7));
    let e = shards::open_dir(&out.join("train"), Some(1)).err().unwrap().to_string();
    assert!(e.contains("another tokenizer"), "{e}");
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::cell::Cell::new(0);
    let run = |inputs: Vec<PathBuf>, column: &str| {
        n.set(n.get() + 1);
        let mut job = Process::new(inputs, dir.path().join(format!("out-{}", n.get())), tokenizer());
        job.progress = false;
        job.text_column = column.into();
        job.run().unwrap_err().to_string()
    };
    let e = run(vec![dir.path().join("missing")], "text");
    assert!(e.contains("missing does not exist") && e.contains("download"), "{e}");
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    let e = run(vec![dir.path().join("empty")], "text");
    assert!(e.contains("has no .parquet or .jsonl files"), "{e}");
    let p = dir.path().join("x.parquet");
    parquet(&p, &rows()[..4]);
    let e = run(vec![p.clone()], "content");
    assert!(e.contains("x.parquet has no column \"content\" (it has: id, text, language, score)"), "{e}");
    std::fs::write(dir.path().join("bad.parquet"), b"PAR1 this is not parquet").unwrap();
    let e = run(vec![dir.path().join("bad.parquet")], "text");
    assert!(e.contains("bad.parquet is not a readable parquet file"), "{e}");
    std::fs::write(dir.path().join("c.jsonl"), "{\"body\": \"x\"}\n").unwrap();
    let e = run(vec![dir.path().join("c.jsonl")], "text");
    assert!(e.contains("c.jsonl:1: no string field \"text\""), "{e}");
    assert!(!e.contains('\n'));
}

/// Two processes preparing one directory at once (two notebooks started together, two test
/// workers on a fresh clone): they take turns on the directory's lock, so one tokenizes, the other
/// finds the shards done, and neither sees the other's half-written files.
#[test]
fn two_jobs_on_one_directory_take_turns() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let many: Vec<_> = (0..100).flat_map(|_| rows()).collect(); // 4,000 documents: the jobs would overlap
    parquet(&inputs.join("a.parquet"), &many);
    let out = dir.path().join("shards");
    let mut job = Process::new(vec![inputs.clone()], &out, tokenizer());
    job.progress = false;
    job.batch_docs = 1;
    job.val_tokens = 30;
    let sums: Vec<_> = std::thread::scope(|s| {
        let a = s.spawn(|| job.clone().run());
        let b = s.spawn(|| job.clone().run());
        [a.join().unwrap(), b.join().unwrap()]
    })
    .into_iter()
    .map(|r| r.unwrap())
    .collect();
    let mut read: Vec<u64> = sums.iter().map(|s| s.docs_read).collect();
    read.sort();
    assert_eq!(read, vec![0, 4000], "one job did the work, the other found it done");
    assert!(walk(&out).iter().all(|p| p.extension().is_none_or(|e| e != "tmp")), "no half-written shard left");
    assert_eq!(shards::open_dir(&out.join("train"), None).unwrap().len(), 1);
}
