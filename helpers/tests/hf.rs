//! Importing Hugging Face OLMoE checkpoints: name mapping, merged experts, clear errors.
use helpers::hf;
use serde::Deserialize;
use tch::{nn, Device, Kind, Tensor};

fn write(dir: &std::path::Path, tensors: &[(&str, &Tensor)]) {
    Tensor::write_safetensors(tensors, dir.join("model.safetensors")).unwrap();
}

/// A tiny stand-in for a notebook model: two stacked experts of width 3 over D = 4.
fn var_store() -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _ = (&root / "model" / "norm").var("weight", &[4], nn::Init::Const(0.0));
    let e = &root / "model" / "layers" / 0 / "mlp" / "experts";
    let _ = e.var("gate_up_proj", &[2, 6, 4], nn::Init::Const(0.0));
    let _ = e.var("down_proj", &[2, 4, 3], nn::Init::Const(0.0));
    vs
}

#[test]
fn stacked_experts_load_as_they_are_and_per_expert_ones_are_stacked_gate_rows_first() {
    let dir = tempfile::tempdir().unwrap();
    let gate_up = Tensor::arange(2 * 6 * 4, (Kind::Float, Device::Cpu)).view([2, 6, 4]); // (E, 2I, D)
    let down = Tensor::arange(2 * 4 * 3, (Kind::Float, Device::Cpu)).view([2, 4, 3]); // (E, D, I)
    let norm = Tensor::ones([4], (Kind::Float, Device::Cpu));
    write(dir.path(), &[
        ("model.norm.weight", &norm),
        ("model.layers.0.mlp.experts.gate_up_proj", &gate_up),
        ("model.layers.0.mlp.experts.down_proj", &down),
    ]);
    let vs = var_store();
    assert_eq!(hf::load_weights(dir.path(), &vs).unwrap(), 3);
    let v = vs.variables();
    assert!(v["model.layers.0.mlp.experts.gate_up_proj"].equal(&gate_up));
    assert!(v["model.layers.0.mlp.experts.down_proj"].equal(&down));
    assert!(v["model.norm.weight"].equal(&norm));

    // The hub's OLMoE layout: one tensor per expert and projection.
    let hub = tempfile::tempdir().unwrap();
    let mut per_expert: Vec<(String, Tensor)> = vec![("model.norm.weight".into(), norm.shallow_clone())];
    for j in 0..2 {
        let p = format!("model.layers.0.mlp.experts.{j}");
        per_expert.push((format!("{p}.gate_proj.weight"), gate_up.get(j).narrow(0, 0, 3).contiguous()));
        per_expert.push((format!("{p}.up_proj.weight"), gate_up.get(j).narrow(0, 3, 3).contiguous()));
        per_expert.push((format!("{p}.down_proj.weight"), down.get(j).contiguous()));
    }
    Tensor::write_safetensors(&per_expert, hub.path().join("model.safetensors")).unwrap();
    let vs = var_store();
    hf::load_weights(hub.path(), &vs).unwrap();
    assert!(vs.variables()["model.layers.0.mlp.experts.gate_up_proj"].equal(&gate_up));
    assert!(vs.variables()["model.layers.0.mlp.experts.down_proj"].equal(&down));

    // Placed experts: each shard gets the rows of its experts.
    let placed = nn::VarStore::new(Device::Cpu);
    let root = placed.root();
    let _ = (&root / "model" / "norm").var("weight", &[4], nn::Init::Const(0.0));
    let e = &root / "model" / "layers" / 0 / "mlp";
    let _ = (&e / "experts[1]").var("gate_up_proj", &[1, 6, 4], nn::Init::Const(0.0));
    let _ = (&e / "experts[0]").var("gate_up_proj", &[1, 6, 4], nn::Init::Const(0.0));
    let _ = (&e / "experts[0,1]").var("down_proj", &[2, 4, 3], nn::Init::Const(0.0));
    hf::load_weights(hub.path(), &placed).unwrap();
    assert!(placed.variables()["model.layers.0.mlp.experts[1].gate_up_proj"].equal(&gate_up.narrow(0, 1, 1)));
    assert!(placed.variables()["model.layers.0.mlp.experts[0,1].down_proj"].equal(&down));

    // A hub checkpoint with an expert's projection missing.
    let broken = tempfile::tempdir().unwrap();
    Tensor::write_safetensors(&per_expert[..per_expert.len() - 1], broken.path().join("model.safetensors")).unwrap();
    let e = hf::load_weights(broken.path(), &var_store()).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.mlp.experts.1.down_proj.weight is missing"), "{e}");
}

#[test]
fn missing_unknown_and_misshaped_tensors_are_named() {
    let vs = var_store();
    let t = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let experts: Vec<(String, Tensor)> =
        vec![("model.layers.0.mlp.experts.gate_up_proj".into(), t(&[2, 6, 4])), ("model.layers.0.mlp.experts.down_proj".into(), t(&[2, 4, 3]))];
    let refs = |extra: Vec<(&'static str, Tensor)>| -> Vec<(String, Tensor)> {
        experts.iter().map(|(n, x)| (n.clone(), x.shallow_clone())).chain(extra.into_iter().map(|(n, x)| (n.to_string(), x))).collect()
    };
    let save = |dir: &std::path::Path, ts: Vec<(String, Tensor)>| Tensor::write_safetensors(&ts, dir.join("model.safetensors")).unwrap();

    let d = tempfile::tempdir().unwrap();
    save(d.path(), refs(vec![]));
    let e = hf::load_weights(d.path(), &vs).unwrap_err().to_string();
    assert!(e.contains("lacks 1 parameter") && e.contains("model.norm.weight"), "{e}");

    let d = tempfile::tempdir().unwrap();
    save(d.path(), refs(vec![("model.norm.weight", t(&[4])), ("model.layers.0.mlp.shared_expert.weight", t(&[2]))]));
    let e = hf::load_weights(d.path(), &vs).unwrap_err().to_string();
    assert!(e.contains("the model does not") && e.contains("model.layers.0.mlp.shared_expert.weight"), "{e}");

    let d = tempfile::tempdir().unwrap();
    save(d.path(), refs(vec![("model.norm.weight", t(&[5]))]));
    let e = hf::load_weights(d.path(), &vs).unwrap_err().to_string();
    assert!(e.contains("model.norm.weight: checkpoint shape [5] != model shape [4]"), "{e}");

    let e = hf::load_weights(tempfile::tempdir().unwrap().path(), &vs).unwrap_err().to_string();
    assert!(e.contains("neither model.safetensors nor model.safetensors.index.json"), "{e}");
}

#[derive(Deserialize, Debug)]
#[allow(dead_code)]
struct Cfg {
    vocab_size: i64,
    hidden_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_experts: i64,
    num_experts_per_tok: i64,
    intermediate_size: i64,
    n_shared_experts: i64,
    n_dense_layers: i64,
    dense_intermediate_size: i64,
    norm_topk_prob: bool,
    rms_norm_eps: f64,
    rope_theta: f64,
    max_position_embeddings: i64,
    initializer_range: f64,
}

#[test]
fn config_json_maps_to_the_notebook_config() {
    let d = tempfile::tempdir().unwrap();
    let base = serde_json::json!({
        "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
        "intermediate_size": 1024, "norm_topk_prob": false, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "max_position_embeddings": 4096,
        "clip_qkv": null, "tie_word_embeddings": false
    });
    std::fs::write(d.path().join("config.json"), base.to_string()).unwrap();
    let c: Cfg = hf::model_config(d.path()).unwrap();
    assert_eq!((c.num_experts, c.num_experts_per_tok, c.intermediate_size, c.n_shared_experts), (64, 8, 1024, 0));
    assert_eq!(c.rope_theta, 10000.0);

    let mut gqa = base.clone();
    gqa["num_key_value_heads"] = 4.into();
    std::fs::write(d.path().join("config.json"), gqa.to_string()).unwrap();
    assert!(hf::model_config::<Cfg>(d.path()).unwrap_err().to_string().contains("grouped-query attention"));
    let mut other = base.clone();
    other["model_type"] = "llama".into();
    std::fs::write(d.path().join("config.json"), other.to_string()).unwrap();
    assert!(hf::model_config::<Cfg>(d.path()).unwrap_err().to_string().contains("expected \"olmoe\""));
}

#[test]
fn export_refuses_what_olmoe_cannot_express() {
    let vs = var_store();
    let tok = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/default/tokenizer.json");
    let d = tempfile::tempdir().unwrap();
    let cfg = |shared: i64, dense: i64| serde_json::json!({"vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
        "num_attention_heads": 1, "num_experts": 2, "num_experts_per_tok": 1, "intermediate_size": 3,
        "n_shared_experts": shared, "n_dense_layers": dense, "norm_topk_prob": false, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 16, "initializer_range": 0.02});
    let named = |vs: &nn::VarStore| vs.variables().into_iter().collect::<Vec<_>>();
    let e = hf::export(d.path().join("a"), &named(&vs), &cfg(1, 0), &tok, 0.01).unwrap_err().to_string();
    assert!(e.contains("no shared experts"), "{e}");
    let e = hf::export(d.path().join("b"), &named(&vs), &cfg(0, 1), &tok, 0.01).unwrap_err().to_string();
    assert!(e.contains("no dense layers"), "{e}");
    let _ = vs.root().var("router_scale", &[2], nn::Init::Const(0.0));
    let e = hf::export(d.path().join("c"), &named(&vs), &cfg(0, 0), &tok, 0.01).unwrap_err().to_string();
    assert!(e.contains("router_scale has no place"), "{e}");
    let _ = (vs.root() / "model" / "layers" / 0 / "mlp").zeros_no_train("lflb_bias", &[2]);
    let e = hf::export(d.path().join("c"), &named(&vs), &cfg(0, 0), &tok, 0.01).unwrap_err().to_string();
    assert!(e.contains("loss-free balancing bias"), "{e}");
    assert!(!d.path().join("c").exists(), "nothing is written when export is refused");
}

#[test]
fn sharded_checkpoints_load_through_their_index() {
    let dir = tempfile::tempdir().unwrap();
    let vs = var_store();
    let names: Vec<String> = vs.variables().keys().cloned().collect();
    let (first, second) = names.split_at(2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let tensors: Vec<(String, Tensor)> = part.iter().map(|n| (n.clone(), vs.variables()[n].ones_like() * 2.0)).collect();
        Tensor::write_safetensors(&tensors, dir.path().join(shard)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), shard.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(hf::load_weights(dir.path(), &vs).unwrap(), 3);
    assert!(vs.variables().values().all(|v| v.eq(2.0).all().int64_value(&[]) == 1));
}

/// Export writes what transformers writes: one `model.safetensors`, or past the shard size shards
/// `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`; every header says
/// `{"format": "pt"}`. Either form reads back equal (memory-mapped), and a later export of the other
/// form leaves no stale file behind.
#[test]
fn weights_are_written_single_or_sharded_with_pt_metadata_and_read_back() {
    let d = tempfile::tempdir().unwrap();
    let named: Vec<(String, Tensor)> = (0..5)
        .map(|i| (format!("model.layers.{i}.mlp.gate.weight"), Tensor::randn([8, 16], (Kind::Float, Device::Cpu))))
        .collect();
    let header = |p: &std::path::Path| -> serde_json::Value {
        let b = std::fs::read(p).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        serde_json::from_slice(&b[8..8 + n]).unwrap()
    };
    let same = |dir: &std::path::Path| {
        let back = hf::read_tensors(dir).unwrap();
        assert_eq!(back.len(), named.len());
        for (n, t) in &named {
            assert!(back[n].equal(t), "{n}");
        }
    };
    // 512 bytes per tensor, at most 1,100 per shard: two per shard, three shards.
    let files = hf::write_weights(d.path(), &named, 1100).unwrap();
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into()).collect();
    assert_eq!(names, ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]);
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], 5 * 512);
    assert_eq!(index["weight_map"]["model.layers.4.mlp.gate.weight"], "model-00003-of-00003.safetensors");
    for f in &files {
        assert_eq!(header(f)["__metadata__"]["format"], "pt");
    }
    same(d.path());
    // One file now: the shards and the index go.
    let files = hf::write_weights(d.path(), &named, hf::MAX_SHARD_BYTES).unwrap();
    assert_eq!(files, vec![d.path().join("model.safetensors")]);
    let mut left: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    left.sort();
    assert_eq!(left, ["model.safetensors"]);
    assert_eq!(header(&files[0])["__metadata__"]["format"], "pt");
    same(d.path());
}
