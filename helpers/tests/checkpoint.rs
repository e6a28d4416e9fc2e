//! Checkpoints: atomic writes under SIGKILL, keep-last-N, resolution, mismatch errors, optimizer
//! state round trips, and metrics truncation on resume.
use helpers::checkpoint::{self, Checkpoint, TrainState};
use helpers::optim::{OptimConfig, Optimizer, Rule};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

fn state(step: i64) -> TrainState {
    TrainState {
        step,
        tokens: step * 100,
        data_position: step as u64 * 2,
        seed: 7,
        skipped_steps: 0,
        wandb_run_id: Some("abc123".into()),
        config: serde_json::json!({"model": {"hidden_size": 8}, "train": {"lr": 0.1, "max_steps": 10}}),
        world_size: 1,
    }
}

/// Weights whose every value is the step, so a torn checkpoint would show as a mismatch.
fn weights(step: i64, numel: i64) -> Vec<(String, Tensor)> {
    vec![("w".into(), Tensor::full([numel], step as f64, (Kind::Float, Device::Cpu)))]
}

fn optim_cfg() -> OptimConfig {
    OptimConfig { lr: 0.1, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, muon_lr: 0.02, muon_momentum: 0.95, muon_nesterov: true, muon_ns_steps: 5, muon_weight_decay: 0.1 }
}

#[test]
fn save_keeps_last_n_and_latest_resolves() {
    let d = tempfile::tempdir().unwrap();
    for step in [10, 20, 30, 40] {
        checkpoint::save(d.path(), &state(step), &weights(step, 4), &[], 2).unwrap();
    }
    let steps: Vec<i64> = checkpoint::list(d.path()).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![30, 40]);
    let ck = Checkpoint::open(d.path()).unwrap();
    assert_eq!(ck.state, state(40));
    assert_eq!(ck.run_dir(), d.path());
    let older = Checkpoint::open(&d.path().join("checkpoints/step-00000030")).unwrap();
    assert_eq!(older.state.step, 30);
    let e = Checkpoint::open(&d.path().join("nope")).err().unwrap().to_string();
    assert!(e.contains("does not exist"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = Checkpoint::open(empty.path()).err().unwrap().to_string();
    assert!(e.contains("has no checkpoint"), "{e}");
}

#[test]
fn mismatched_config_and_weights_are_named() {
    let d = tempfile::tempdir().unwrap();
    checkpoint::save(d.path(), &state(5), &weights(5, 4), &[], 0).unwrap();
    let ck = Checkpoint::open(d.path()).unwrap();
    let changed = serde_json::json!({"model": {"hidden_size": 16}, "train": {"lr": 0.1, "max_steps": 20}});
    let e = ck.check_config(&changed, &["train.max_steps"]).unwrap_err().to_string();
    assert!(e.contains("model.hidden_size: checkpoint 8, now 16"), "{e}");
    assert!(!e.contains("max_steps"), "allowed changes are not errors: {e}");
    ck.check_config(&serde_json::json!({"model": {"hidden_size": 8}, "train": {"lr": 0.1, "max_steps": 99}}), &["train.max_steps"]).unwrap();

    let mut vars = HashMap::new();
    vars.insert("w".to_string(), Tensor::zeros([5], (Kind::Float, Device::Cpu)));
    let e = ck.load_weights(&vars).unwrap_err().to_string();
    assert!(e.contains("w has shape [4] but the model's has [5]"), "{e}");
    vars.insert("w".to_string(), Tensor::zeros([4], (Kind::Float, Device::Cpu)));
    vars.insert("extra".to_string(), Tensor::zeros([1], (Kind::Float, Device::Cpu)));
    let e = ck.load_weights(&vars).unwrap_err().to_string();
    assert!(e.contains("has no tensor extra"), "{e}");
    vars.remove("extra");
    assert_eq!(ck.load_weights(&vars).unwrap(), 1);
    assert_eq!(vars["w"].sum(Kind::Float).double_value(&[]), 20.0);
}

/// Not a test on its own: the child process of `sigkill_during_saves_never_breaks_latest`.
#[test]
#[ignore]
fn checkpoint_writer_child() {
    let Ok(dir) = std::env::var("MOE_TEST_CKPT_DIR") else { return };
    for step in 1.. {
        // 32 MB per checkpoint, so a kill often lands mid-write.
        checkpoint::save(Path::new(&dir), &state(step), &weights(step, 8 << 20), &[], 2).unwrap();
    }
}

#[test]
fn sigkill_during_saves_never_breaks_latest() {
    let d = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut last_step = 0;
    for (i, delay_ms) in [700u64, 950, 1300, 1650, 2100].into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .args(["--ignored", "--exact", "checkpoint_writer_child", "--nocapture"])
            .env("MOE_TEST_CKPT_DIR", d.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let torn = std::fs::read_dir(d.path().join("checkpoints")).map(|r| r.flatten().any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))).unwrap_or(false);
        eprintln!("kill after {delay_ms} ms: a checkpoint was {}", if torn { "half-written" } else { "not being written" });
        let Ok(ck) = Checkpoint::open(d.path()) else {
            assert_eq!(i, 0, "after a first checkpoint exists, latest must always resolve");
            continue;
        };
        // The checkpoint latest names is complete and self-consistent.
        let mut vars = HashMap::new();
        vars.insert("w".to_string(), Tensor::zeros([8 << 20], (Kind::Float, Device::Cpu)));
        ck.load_weights(&vars).unwrap();
        let (lo, hi) = (vars["w"].min().double_value(&[]), vars["w"].max().double_value(&[]));
        assert_eq!((lo, hi), (ck.state.step as f64, ck.state.step as f64), "weights of checkpoint {}", ck.dir.display());
        assert!(ck.state.step >= 1);
        last_step = ck.state.step;
    }
    assert!(last_step >= 1, "no checkpoint was completed at all; the writer is too slow for this test");
}

#[test]
fn adamw_first_step_matches_the_closed_form() {
    // After one step m_hat = g and v_hat = g^2: w1 = w0 (1 - lr wd) - lr g / (|g| + eps).
    let w = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).set_requires_grad(true);
    let mut opt = Optimizer::new(vec![("w".into(), w.shallow_clone(), Rule::AdamW)], optim_cfg()).unwrap();
    (&w * Tensor::from_slice(&[3.0f32, -0.5, 0.25])).sum(Kind::Float).backward();
    opt.step(1.0);
    let got: Vec<f32> = Vec::try_from(&w).unwrap();
    let expect = [1.0 * 0.99 - 0.1, -2.0 * 0.99 + 0.1, 0.5 * 0.99 - 0.1];
    for (g, e) in got.iter().zip(expect) {
        assert!((*g as f64 - e).abs() < 1e-6, "{got:?} vs {expect:?}");
    }
}

/// Two identical optimizers: one runs 5 steps straight; the other runs 2, is saved and restored
/// into a fresh optimizer, and runs 3 more. The weights must be identical, for AdamW and Muon.
#[test]
fn optimizer_state_round_trip_continues_exactly() {
    let grads = |k: i64| Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]).sin() * (k + 1) as f64;
    let make = || {
        let a = Tensor::ones([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let opt = Optimizer::new(vec![("a".into(), a.shallow_clone(), Rule::AdamW), ("b".into(), b.shallow_clone(), Rule::Muon)], optim_cfg()).unwrap();
        (a, b, opt)
    };
    let run = |a: &Tensor, b: &Tensor, opt: &mut Optimizer, steps: std::ops::Range<i64>| {
        for k in steps {
            opt.zero_grad();
            ((a * grads(k)).sum(Kind::Float) + (b * grads(k + 7)).sum(Kind::Float)).backward();
            opt.step(0.5);
        }
    };
    let (a1, b1, mut o1) = make();
    run(&a1, &b1, &mut o1, 0..5);

    let (a2, b2, mut o2) = make();
    run(&a2, &b2, &mut o2, 0..2);
    let d = tempfile::tempdir().unwrap();
    checkpoint::save(d.path(), &state(o2.step), &o2.weights(), &o2.state_tensors(), 0).unwrap();
    let (a3, b3, mut o3) = make();
    let ck = Checkpoint::open(d.path()).unwrap();
    let vars: HashMap<String, Tensor> = [("a".to_string(), a3.shallow_clone()), ("b".to_string(), b3.shallow_clone())].into();
    ck.load_weights(&vars).unwrap();
    o3.load_state(ck.optimizer_state().unwrap(), ck.state.step).unwrap();
    run(&a3, &b3, &mut o3, 2..5);
    assert!(a1.equal(&a3) && b1.equal(&b3), "resumed optimizer diverged");
    assert_eq!(o3.step, 5);
    // The update count is saved, not taken from the training step (they differ after skipped steps).
    let (_, _, mut o5) = make();
    o5.load_state(ck.optimizer_state().unwrap(), 99).unwrap();
    assert_eq!(o5.step, 2);

    // A checkpoint from another optimizer is refused with the parameter's name.
    let (_, _, mut o4) = make();
    let mut st = ck.optimizer_state().unwrap();
    st.remove("exp_avg.a");
    let e = o4.load_state(st, 2).unwrap_err().to_string();
    assert!(e.contains("exp_avg.a is missing"), "{e}");
}

#[test]
fn mixed_precision_keeps_fp32_masters() {
    let w = Tensor::full([4, 4], 1.0, (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut opt = Optimizer::new(vec![("w".into(), w.shallow_clone(), Rule::AdamW)], optim_cfg()).unwrap();
    opt.cast_params(Kind::BFloat16, true);
    assert_eq!(w.kind(), Kind::BFloat16, "the model's tensor is cast in place");
    for _ in 0..3 {
        opt.zero_grad();
        (&w * 1e-3).sum(Kind::Float).backward();
        opt.step(0.001); // updates far below bf16's resolution at 1.0
    }
    let master = &opt.weights()[0].1;
    assert_eq!(master.kind(), Kind::Float);
    assert!(master.max().double_value(&[]) < 1.0, "the fp32 master moved");
    assert_eq!(w.max().double_value(&[]), 1.0, "the bf16 copy is the master rounded");
    assert!(opt.state_tensors().iter().any(|(n, t)| n == "master.w" && t.kind() == Kind::Float));
}

#[test]
fn resumed_metrics_drop_rows_after_the_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let run = helpers::RunDir::at(d.path()).unwrap();
    let mut m = run.metrics().unwrap();
    for step in [0, 5, 10, 15] {
        m.log(&serde_json::json!({"step": step, "train.loss": step as f64})).unwrap();
    }
    drop(m);
    // A torn last line, as a kill during a write could leave.
    std::fs::OpenOptions::new().append(true).open(run.file("metrics.jsonl")).unwrap().write_all(b"{\"step\": 2").unwrap();
    let mut m = run.metrics_resumed(10).unwrap();
    m.log(&serde_json::json!({"step": 15, "train.loss": 1.5})).unwrap();
    let steps: Vec<(i64, f64)> = run.read_metrics().unwrap().iter().map(|r| (r["step"].as_i64().unwrap(), r["train.loss"].as_f64().unwrap())).collect();
    assert_eq!(steps, vec![(0, 0.0), (5, 5.0), (10, 10.0), (15, 1.5)]);
}

use std::io::Write;

#[test]
fn training_curves_png_is_written() {
    let d = tempfile::tempdir().unwrap();
    let rows: Vec<serde_json::Value> = (0..20)
        .map(|s| serde_json::json!({"step": s, "train.base_loss": 10.0 - s as f64 * 0.2, "lr": 1e-3, "val.loss": if s % 5 == 0 { serde_json::json!(9.0 - s as f64 * 0.1) } else { serde_json::Value::Null }}))
        .collect();
    let p = d.path().join("curves.png");
    helpers::plot::training_curves(&rows, &p, "test").unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(helpers::plot::series(&rows, "val.loss").len(), 4);
}

#[test]
fn the_optimizer_summary_names_only_what_applies() {
    let t = |n: i64| Tensor::zeros([n / 1000, 1000], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let adamw_only = Optimizer::new(vec![("a".into(), t(2_000_000), Rule::AdamW)], optim_cfg()).unwrap();
    assert_eq!(adamw_only.summary(), "AdamW on 2.00M parameters");
    let mixed = Optimizer::new(
        vec![("a".into(), t(1_000_000), Rule::AdamW), ("n".into(), t(10_000), Rule::AdamWNoDecay), ("m".into(), t(3_000_000), Rule::Muon)],
        optim_cfg(),
    )
    .unwrap();
    assert_eq!(mixed.summary(), "AdamW on 1.01M parameters (0.01M of them without weight decay); Muon on 3.00M");
}
