//! The real OLMoE tokenizer, and the metrics log.
use helpers::data::Tokenizer;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(root().join(helpers::data::DEFAULT_TOKENIZER)).unwrap()
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
