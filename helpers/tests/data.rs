//! The bundled-data pipeline on the real OLMoE tokenizer and a small corpus made here.
use helpers::data::{Corpus, Tokenizer};
use std::path::PathBuf;
use tch::Device;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(root().join(helpers::data::DEFAULT_TOKENIZER)).unwrap()
}

fn write_corpus(dir: &std::path::Path, docs: &[&str]) -> PathBuf {
    let p = dir.join("tiny.jsonl");
    let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({ "text": d }).to_string()).collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

#[test]
fn olmoe_tokenizer_ids() {
    let tok = tokenizer();
    assert_eq!(tok.eos_id, 50279, "OLMoE's EOS is 50279 (a config in the wild says 0)");
    assert_eq!(tok.vocab_size, 50280);
    // GPT-NeoX BPE: "Hello" is 12092, " world" is 1533; no BOS is added.
    assert_eq!(tok.encode("Hello world").unwrap(), vec![12092, 1533]);
    assert_eq!(tok.decode(&[12092, 1533, 50279]).unwrap(), "Hello world<|endoftext|>");
}

#[test]
fn split_by_documents_with_eos_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let docs = ["To be, or not to be: that is the question.", "All the world's a stage.", "Now is the winter of our discontent."];
    let corpus = write_corpus(dir.path(), &docs);
    let cache = dir.path().join("cache");
    let c = Corpus::load(&corpus, &tok, &cache, 0.1).unwrap();
    // The first document is validation, the other two are train, each followed by EOS.
    let enc = |s: &str| -> Vec<u32> { tok.encode(s).unwrap().into_iter().map(|x| x as u32).chain([50279]).collect() };
    assert_eq!(c.val, enc(docs[0]));
    assert_eq!(c.train, [enc(docs[1]), enc(docs[2])].concat());
    // Second load comes from the cache, identical.
    assert!(c.cache_path.exists());
    let c2 = Corpus::load(&corpus, &tok, &cache, 0.1).unwrap();
    assert_eq!((c2.train, c2.val), (c.train.clone(), c.val.clone()));
    // A damaged cache is rebuilt, not trusted.
    let bytes = std::fs::read(&c.cache_path).unwrap();
    std::fs::write(&c.cache_path, &bytes[..bytes.len() - 3]).unwrap();
    let c3 = Corpus::load(&corpus, &tok, &cache, 0.1).unwrap();
    assert_eq!(c3.train, c.train);
    assert_eq!(std::fs::read(&c.cache_path).unwrap(), bytes);
}

#[test]
fn batches_are_shifted_windows_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let text = "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. ".repeat(20);
    let corpus = write_corpus(dir.path(), &[&text, &text, &text]);
    let c = Corpus::load(&corpus, &tok, dir.path(), 0.3).unwrap();
    let (x, y) = c.train_batch(7, 3, 4, 16, Device::Cpu).unwrap();
    assert_eq!(x.size(), vec![4, 16]);
    assert_eq!(x.kind(), tch::Kind::Int64);
    // Targets are the inputs shifted by one token.
    assert!(x.narrow(1, 1, 15).equal(&y.narrow(1, 0, 15)));
    let (x2, _) = c.train_batch(7, 3, 4, 16, Device::Cpu).unwrap();
    assert!(x.equal(&x2), "same (seed, index) must give the same batch");
    let (x3, _) = c.train_batch(7, 4, 4, 16, Device::Cpu).unwrap();
    assert!(!x.equal(&x3), "the next index must give another batch");
    let val = c.val_batches(2, 16, 100, Device::Cpu).unwrap();
    assert!(!val.is_empty());
    let first = &val[0].0;
    assert_eq!(Vec::<i64>::try_from(first.get(0)).unwrap(), c.val[..16].iter().map(|&t| t as i64).collect::<Vec<_>>());
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let e = Corpus::load(dir.path().join("missing.jsonl"), &tok, dir.path(), 0.1).err().unwrap();
    assert!(format!("{e:#}").contains("cannot read corpus"), "{e:#}");
    let p = dir.path().join("bad.jsonl");
    std::fs::write(&p, "{\"text\": \"a\"}\n{\"body\": \"b\"}\n").unwrap();
    let e = Corpus::load(&p, &tok, dir.path(), 0.1).err().unwrap();
    assert!(e.to_string().contains("bad.jsonl:2: no string field \"text\""), "{e}");
    let e = Tokenizer::from_file(dir.path().join("nope.json")).err().unwrap();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let one = write_corpus(dir.path(), &["only one"]);
    assert!(Corpus::load(&one, &tok, dir.path(), 0.1).err().unwrap().to_string().contains("at least 2"));
}

#[test]
fn metrics_log_appends_whole_rows() {
    let dir = tempfile::tempdir().unwrap();
    let run = helpers::RunDir::at(dir.path().join("run")).unwrap();
    let mut m = run.metrics().unwrap();
    m.log(&serde_json::json!({"step": 0, "train.loss": 10.9})).unwrap();
    m.log(&serde_json::json!({"step": 1, "train.loss": 10.1})).unwrap();
    assert!(m.log(&serde_json::json!([1, 2])).is_err());
    drop(m);
    let text = std::fs::read_to_string(run.file("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["step"], 1);
    run.write_json("config.json", &serde_json::json!({"a": 1})).unwrap();
    assert_eq!(std::fs::read_to_string(run.file("config.json")).unwrap(), "{\n  \"a\": 1\n}\n");
    assert_eq!(helpers::run::fmt_duration(3725.0), "1h02m");
    assert_eq!(helpers::run::utc_timestamp().len(), 15);
}
