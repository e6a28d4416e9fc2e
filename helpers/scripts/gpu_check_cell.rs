// The GPU check's own cell. helpers/scripts/gpu_check.py appends it to the base experiment's
// sections (first cell, Configuration, Model, Data, Optimizer, Training step, Generation) and
// `moe-program` compiles the result, so every check runs the experiment's own model and training
// step. It reads a list of checks from MOE_CHECK (JSON), runs them on MOE_DEVICE, and writes the
// results to $MOE_RUN_DIR/check.json (also printed, one line each, after "@@check@@").

/// A model config by preset name, optionally with fewer layers or no shared experts.
fn check_model_cfg(spec: &serde_json::Value) -> anyhow::Result<ModelConfig> {
    let mut cfg = preset(spec["preset"].as_str().unwrap_or("cpu"))?.0;
    if let Some(l) = spec["layers"].as_i64() { cfg.num_hidden_layers = l; }
    if let Some(s) = spec["shared_experts"].as_i64() { cfg.n_shared_experts = s; }
    if let Some(e) = spec["experts"].as_i64() { cfg.num_experts = e; }
    if let Some(k) = spec["top_k"].as_i64() { cfg.num_experts_per_tok = k; }
    if let Some(i) = spec["intermediate"].as_i64() { cfg.intermediate_size = i; }
    if let Some(d) = spec["hidden"].as_i64() { cfg.hidden_size = d; }
    cfg.max_position_embeddings = cfg.max_position_embeddings.max(spec["seq"].as_i64().unwrap_or(0));
    cfg.validate()?;
    Ok(cfg)
}

fn check_kind(spec: &serde_json::Value) -> Kind {
    if spec["dtype"].as_str() == Some("fp32") { Kind::Float } else { Kind::BFloat16 }
}

/// A fresh model (seed 0) on `device` with fp32 weights, and its parameters by name (sorted).
fn check_model(cfg: &ModelConfig, device: Device) -> (nn::VarStore, OlmoeForCausalLM, Vec<(String, Tensor)>) {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let model = OlmoeForCausalLM::new(&vs, cfg);
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    (vs, model, named)
}

/// Loss and gradients (fp32, on the CPU, by name) of one forward+backward of the notebook's training step.
fn check_grads(model: &OlmoeForCausalLM, named: &[(String, Tensor)], x: &Tensor, y: &Tensor, c: &TrainConfig) -> (f64, Vec<(String, Tensor)>) {
    for (_, t) in named { let mut g = t.grad(); if g.defined() { let _ = g.zero_(); } }
    let out = forward_backward(model, x, y, c, c.aux_loss_coef, 1.0, false, false);
    // copy(): on the CPU in fp32 the conversions are no-ops, and the next backward would write into these.
    let grads = named.iter().map(|(n, t)| (n.clone(), t.grad().to_device(Device::Cpu).to_kind(Kind::Float).copy())).collect();
    (out.get("base_loss").double_value(&[]), grads)
}

/// Relative differences between two sets of gradients: the largest per tensor (norm of the difference
/// over the tensor's norm, and which tensor) and the overall one (all tensors as one vector).
fn check_grad_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> (f64, String, f64) {
    let mut worst = (0f64, String::new());
    let (mut diff2, mut norm2) = (0f64, 0f64);
    for ((n, ga), (_, gb)) in a.iter().zip(b) {
        let (d, g) = ((ga - gb).norm().double_value(&[]), gb.norm().double_value(&[]));
        diff2 += d * d;
        norm2 += g * g;
        let rel = d / g.max(1e-30);
        if rel > worst.0 || rel.is_nan() { worst = (rel, n.clone()); }
    }
    (worst.0, worst.1, (diff2 / norm2.max(1e-300)).sqrt())
}

fn check_batch(cfg: &ModelConfig, b: i64, t: i64, device: Device) -> (Tensor, Tensor) {
    tch::manual_seed(1);
    let x = Tensor::randint_low(2, cfg.vocab_size.min(50000), [b, t + 1], (Kind::Int64, device));
    (x.narrow(1, 0, t), x.narrow(1, 1, t))
}

fn check_sync(device: Device) { if let Device::Cuda(i) = device { tch::Cuda::synchronize(i as i64); } }

/// The "Memory" cell's estimate for a config, micro-batch and precision on one device (bytes).
fn check_memory_estimate(cfg: &ModelConfig, c: &TrainConfig, kind: Kind, device: Device) -> anyhow::Result<f64> {
    let shape = helpers::memory::ModelShape { vocab: cfg.vocab_size, hidden: cfg.hidden_size, layers: cfg.num_hidden_layers,
        experts: cfg.num_experts, top_k: cfg.num_experts_per_tok, intermediate: cfg.intermediate_size,
        shared_experts: cfg.n_shared_experts, dense_layers: cfg.n_dense_layers, dense_intermediate: cfg.dense_intermediate_size };
    let train = helpers::memory::TrainShape { micro_batch: c.micro_batch_size, seq_len: c.seq_len,
        compute_bytes: kind.elt_size_in_bytes() as i64, master_weights: kind != Kind::Float, muon_fraction: 0.0,
        activation_checkpointing: c.activation_checkpointing, loss_chunk: c.loss_chunk };
    let est = helpers::memory::estimate(&shape, &train, &[(format!("{device:?}"), None)], &[])?;
    Ok(est.devices[0].peak())
}

/// Runs one check; its result as JSON. (Items cannot see a notebook's variables: they come as arguments.)
fn run_check(spec: &serde_json::Value, rt: &helpers::runtime::Runtime, train_cfg: &TrainConfig, tokenizer: &helpers::Tokenizer) -> anyhow::Result<serde_json::Value> {
    let op = spec["op"].as_str().unwrap_or("");
    let device = rt.device;
    Ok(match op {
        // What the runtime found: the CUDA library, the devices.
        "runtime" => serde_json::json!({
            "device": format!("{device:?}"), "cuda_devices": rt.cuda_devices, "threads": rt.threads,
            "cuda_library": rt.cuda_library.as_ref().map(|p| p.display().to_string()), "cuda_note": rt.cuda_note,
            "cuda_available": tch::Cuda::is_available(), "libtorch": helpers::runtime::libtorch_dir()?.display().to_string(),
        }),
        // A square GEMM in the compute dtype: the peak the MFU figures are measured against.
        "peak" => {
            let n = spec["n"].as_i64().unwrap_or(if device.is_cuda() { 8192 } else { 1024 });
            serde_json::json!({ "n": n, "dtype": format!("{:?}", check_kind(spec)), "peak_flops": helpers::perf::measure_gemm_peak(device, check_kind(spec), n, 5) })
        }
        // The notebook's training step (forward_backward, clipping, the optimizer step) timed at a
        // shape; tokens/s, FLOPs per token, the memory estimate and the device's used memory.
        "step" => {
            let cfg = check_model_cfg(spec)?;
            let kind = check_kind(spec);
            let (b, t) = (spec["batch"].as_i64().unwrap_or(1), spec["seq"].as_i64().unwrap_or(2048));
            let base_c = preset(spec["preset"].as_str().unwrap_or("cpu"))?.1;
            let c = TrainConfig { micro_batch_size: b, seq_len: t,
                activation_checkpointing: spec["checkpointing"].as_bool().unwrap_or(base_c.activation_checkpointing), ..base_c };
            // What this step adds to memory: the device's used memory (or the process's RSS) before it.
            let used_before = match device { Device::Cuda(i) => helpers::memory::cuda_mem_info(i).ok().map(|(free, total)| (total - free) as f64), _ => None };
            let rss_before = if device.is_cuda() { None } else { helpers::memory::reset_peak_rss().ok().and_then(|_| helpers::memory::rss_bytes().ok()).map(|b| b as f64) };
            let (vs, model, named) = check_model(&cfg, device);
            let mut opt = helpers::optim::Optimizer::new(named.iter().map(|(n, t)| (n.clone(), t.shallow_clone(), update_rule(n, t, &c))).collect(),
                helpers::optim::OptimConfig { lr: 1e-4, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: c.weight_decay,
                    muon_lr: c.muon_lr, muon_momentum: c.muon_momentum, muon_nesterov: c.muon_nesterov, muon_ns_steps: c.muon_ns_steps,
                    muon_weight_decay: c.muon_weight_decay })?;
            if kind != Kind::Float { opt.cast_params(kind, true); }
            let (x, y) = check_batch(&cfg, b, t, device);
            let steps = spec["steps"].as_i64().unwrap_or(3).max(1);
            let mut times = Vec::new();
            let mut loss = f64::NAN;
            for s in 0..=steps {
                check_sync(device);
                let t0 = std::time::Instant::now();
                opt.zero_grad();
                let out = forward_backward(&model, &x, &y, &c, c.aux_loss_coef, 1.0, false, false);
                let _ = clip_gradients(&named, &c, None)?;
                opt.step(1.0);
                check_sync(device);
                if s > 0 { times.push(t0.elapsed().as_secs_f64()); }
                if s == steps { loss = out.get("base_loss").double_value(&[]); }
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let (n_total, n_active) = cfg.param_counts();
            let flops = helpers::perf::train_flops_per_token(n_active - cfg.vocab_size * cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size, t);
            let used = match device { Device::Cuda(i) => helpers::memory::cuda_mem_info(i).ok().map(|(free, total)| (total - free) as f64), _ => None };
            let rss = if device.is_cuda() { None } else { helpers::memory::peak_rss_bytes().ok().map(|b| b as f64) };
            drop((opt, model, vs));
            serde_json::json!({ "shape": { "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                    "experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok, "intermediate": cfg.intermediate_size,
                    "shared_experts": cfg.n_shared_experts, "vocab": cfg.vocab_size },
                "batch": b, "seq": t, "dtype": format!("{kind:?}"), "activation_checkpointing": c.activation_checkpointing,
                "parameters": n_total, "active_parameters": n_active, "step_s": times[times.len() / 2], "steps_s": times,
                "tokens_per_s": (b * t) as f64 / times[times.len() / 2], "flops_per_token": flops, "loss": loss,
                "memory_estimate_bytes": check_memory_estimate(&cfg, &c, kind, device)?, "device_used_bytes": used,
                "device_used_before_bytes": used_before, "peak_rss_bytes": rss, "rss_before_bytes": rss_before })
        }
        // The grouped expert path against the per-expert reference loop, same weights and batch.
        "paths" => {
            let cfg = check_model_cfg(spec)?;
            let kind = check_kind(spec);
            let c = TrainConfig { activation_checkpointing: false, ..train_cfg.clone() };
            let (mut vs, mut model, named) = check_model(&cfg, device);
            vs.set_kind(kind); // pure bf16 weights: both paths see the same bf16 tensors
            let (x, y) = check_batch(&cfg, spec["batch"].as_i64().unwrap_or(4), spec["seq"].as_i64().unwrap_or(256), device);
            let mut out = serde_json::Map::new();
            let mut reference: Option<(f64, Vec<(String, Tensor)>, Tensor)> = None;
            for imp in [MoeImpl::Loop, MoeImpl::Grouped, MoeImpl::Sorted] {
                for layer in model.layers.iter_mut() { if let FeedForward::Sparse(m) = &mut layer.mlp { m.moe_impl = imp; } }
                let grouped_ran = model.moe_blocks().first().map(|m| m.experts.grouped_applies(&Tensor::zeros([1, cfg.hidden_size], (kind, device)))).unwrap_or(false);
                let (loss, grads) = check_grads(&model, &named, &x, &y, &c);
                let logits = tch::no_grad(|| model.forward(&x).0.to_kind(Kind::Float).to_device(Device::Cpu));
                let name = format!("{imp:?}").to_lowercase();
                out.insert(format!("{name}.loss"), loss.into());
                if imp == MoeImpl::Grouped { out.insert("grouped.applies".into(), grouped_ran.into()); }
                match &reference {
                    None => reference = Some((loss, grads, logits)),
                    Some((l0, g0, lg0)) => {
                        let (rel, worst, overall) = check_grad_diff(&grads, g0);
                        out.insert(format!("{name}.loss_rel_diff"), ((loss - l0).abs() / l0.abs()).into());
                        out.insert(format!("{name}.grad_rel_diff"), overall.into());
                        out.insert(format!("{name}.grad_worst_rel_diff"), rel.into());
                        out.insert(format!("{name}.grad_worst_tensor"), worst.into());
                        out.insert(format!("{name}.logits_max_abs_diff"), (&logits - lg0).abs().max().double_value(&[]).into());
                    }
                }
            }
            out.insert("dtype".into(), format!("{kind:?}").into());
            serde_json::Value::Object(out)
        }
        // Greedy generation with the KV cache against recomputing the whole prefix for every token.
        "kv" => {
            let cfg = check_model_cfg(spec)?;
            let (_vs, model, _) = check_model(&cfg, device);
            let prompt = tokenizer.encode("ROMEO.\n")?;
            let n = spec["tokens"].as_i64().unwrap_or(16);
            let cached = generate(&model, &prompt, n, &helpers::generate::Sampling::greedy(), -1, device);
            let mut ids = prompt.clone();
            let mut worst = 0f64;
            tch::no_grad(|| {
                let mut cache: Vec<KvCache> = model.layers.iter().map(|_| KvCache::default()).collect();
                let mut step_logits = model.forward_with_cache(&Tensor::from_slice(&prompt).to_device(device).unsqueeze(0), &mut cache);
                for _ in 0..n {
                    let full = model.forward(&Tensor::from_slice(&ids).to_device(device).unsqueeze(0)).0.select(1, -1);
                    let last = step_logits.select(1, -1);
                    worst = worst.max((&full - &last).abs().max().double_value(&[]) / full.abs().max().double_value(&[]).max(1e-30));
                    let next = full.argmax(-1, false).int64_value(&[0]);
                    ids.push(next);
                    step_logits = model.forward_with_cache(&Tensor::from_slice(&[next]).to_device(device).unsqueeze(0), &mut cache);
                }
            });
            serde_json::json!({ "tokens_equal": cached == ids, "logits_worst_rel_diff": worst, "tokens": n })
        }
        // Experts placed on a map of devices (e.g. cuda:0 and cpu) against the unplaced model.
        "placed" => {
            let cfg = check_model_cfg(spec)?;
            let c = TrainConfig { activation_checkpointing: false, ..train_cfg.clone() };
            let spec_map = spec["placement"].as_str().unwrap_or("round-robin:cpu");
            let devices: Vec<Device> = helpers::placement::parse(spec_map, cfg.num_experts as usize)?;
            let (x, y) = check_batch(&cfg, spec["batch"].as_i64().unwrap_or(4), spec["seq"].as_i64().unwrap_or(128), device);
            let (_vs0, m0, n0) = check_model(&cfg, device);
            let (l0, g0) = check_grads(&m0, &n0, &x, &y, &c);
            let (vs1, mut m1, _) = check_model(&cfg, device);
            m1.place_experts(&vs1, &helpers::placement::shards(&devices));
            let mut n1: Vec<(String, Tensor)> = vs1.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
            n1.sort_by(|a, b| a.0.cmp(&b.0));
            let (l1, g1) = check_grads(&m1, &n1, &x, &y, &c);
            let mut g1 = helpers::placement::gather(g1)?; // shards joined into the stacks, as the unplaced model has them
            g1.sort_by(|a, b| a.0.cmp(&b.0));
            let (rel, worst, overall) = check_grad_diff(&g1, &g0);
            serde_json::json!({ "grad_rel_diff": overall, "placement": spec_map, "devices": devices.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>(),
                "loss_unplaced": l0, "loss_placed": l1, "loss_rel_diff": (l1 - l0).abs() / l0.abs(),
                "grad_worst_rel_diff": rel, "grad_worst_tensor": worst })
        }
        other => anyhow::bail!("unknown check {other:?}"),
    })
}

let checks: Vec<serde_json::Value> = serde_json::from_str(&std::env::var("MOE_CHECK").unwrap_or_else(|_| "[]".into()))?;
let mut results = Vec::new();
for spec in &checks {
    let t0 = std::time::Instant::now();
    // A libtorch error inside a check is a Rust panic (tch's panicking calls): caught, so the other
    // checks still run and this one reports the message.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_check(spec, &rt, &train_cfg, &tokenizer)));
    let mut r = match outcome {
        Ok(Ok(v)) => serde_json::json!({ "ok": true, "result": v }),
        Ok(Err(e)) => serde_json::json!({ "ok": false, "error": format!("{e:#}") }),
        Err(p) => serde_json::json!({ "ok": false, "error": format!("panicked: {}",
            p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()) }),
    };
    r["check"] = spec.clone();
    r["seconds"] = t0.elapsed().as_secs_f64().into();
    println!("@@check@@{r}");
    results.push(r);
}
std::fs::write(run.file("check.json"), serde_json::to_string_pretty(&results)?)?;
