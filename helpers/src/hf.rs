//! Hugging Face OLMoE checkpoints: read `config.json` into the notebook's `ModelConfig`, and load
//! `model.safetensors` (or a sharded `model.safetensors.index.json`) into the notebook's VarStore.
//!
//! The notebook's parameter names and layout are transformers 5.x's: each MoE layer's experts are
//! stacked, `mlp.experts.gate_up_proj [E, 2I, D]` (gate rows first) and `mlp.experts.down_proj
//! [E, D, I]`, so such a checkpoint loads name by name. The published OLMoE checkpoints store one
//! tensor per expert (`mlp.experts.{j}.gate_proj.weight`, ...): those are stacked at load. Placed
//! experts' shards are cut from the stacks ([`crate::placement::lookup`]). A tensor the model does
//! not have, a parameter the checkpoint lacks, or a shape mismatch is an error naming it.
//!
//! [`resolve`] turns a hub id (`allenai/OLMoE-1B-7B-0924`, optionally `@revision`) into a local
//! directory through `hf-hub`, honouring `HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN` and `HF_HUB_OFFLINE`.
use crate::WithCause;
use anyhow::{bail, ensure, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Tensor};

/// A checkpoint directory for `id_or_dir`: an existing local directory as it is, otherwise a hub
/// model id `owner/name[@revision]` whose `config.json` and safetensors (single or sharded) are
/// downloaded into the hub cache (`$HF_HOME/hub`), with a progress bar, resuming partial files.
/// `HF_HUB_OFFLINE=1` uses only what the cache already holds. `HF_TOKEN` (or `$HF_HOME/token`)
/// authenticates gated or private repositories.
pub fn resolve(id_or_dir: &str) -> Result<PathBuf> {
    let local = Path::new(id_or_dir);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    let (id, revision) = id_or_dir.split_once('@').unwrap_or((id_or_dir, "main"));
    ensure!(
        id.split('/').count() == 2 && !id.starts_with('/') && !id.starts_with('.'),
        "{id_or_dir:?} is neither an existing directory nor a hub id like allenai/OLMoE-1B-7B-0924[@revision]"
    );
    let hub = Hub::new(id, hf_hub::RepoType::Model, revision)?;
    let fetch = |f: &str| hub.get(f);
    let offline = hub.offline;
    let where_ = if offline { "in the local hub cache (HF_HUB_OFFLINE=1; run once online, or pass a local directory)" } else { "on the hub" };
    let config = fetch("config.json")?.with_context(|| format!("{id_or_dir}: config.json not found {where_}"))?;
    if fetch("model.safetensors")?.is_none() {
        let index = fetch("model.safetensors.index.json")?
            .with_context(|| format!("{id_or_dir}: neither model.safetensors nor model.safetensors.index.json found {where_}"))?;
        for shard in weight_files_listed(&index)? {
            fetch(&shard)?.with_context(|| format!("{id_or_dir}: shard {shard} not found {where_}"))?;
        }
    }
    Ok(config.parent().context("hub cache path has no parent")?.to_path_buf())
}

/// `HF_HUB_OFFLINE` set to 1/true/yes: use only the local hub cache.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "YES")).unwrap_or(false)
}

/// One hub repository (model or dataset) at a revision, through `hf-hub`: files land in the hub
/// cache (`$HF_HOME/hub`, resuming a `.part` file left by an interrupted download), `HF_ENDPOINT`
/// and `HF_TOKEN` (or `$HF_HOME/token`) are honoured, and `HF_HUB_OFFLINE=1` turns every lookup
/// into a cache-only one that never touches the network.
pub struct Hub {
    pub id: String,
    pub revision: String,
    pub offline: bool,
    repo: hf_hub::Repo,
    api: Option<hf_hub::api::sync::ApiRepo>,
}

impl Hub {
    pub fn new(id: &str, kind: hf_hub::RepoType, revision: &str) -> Result<Self> {
        Self::with_retries(id, kind, revision, 3)
    }

    /// `retries`: how many times a failed transfer is resumed before giving up (0: fail at once).
    pub fn with_retries(id: &str, kind: hf_hub::RepoType, revision: &str, retries: usize) -> Result<Self> {
        let repo = hf_hub::Repo::with_revision(id.to_string(), kind, revision.to_string());
        let offline = offline();
        let api = if offline {
            None
        } else {
            let mut builder = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true).with_retries(retries);
            if let Ok(token) = std::env::var("HF_TOKEN") {
                if !token.trim().is_empty() {
                    builder = builder.with_token(Some(token.trim().to_string()));
                }
            }
            Some(builder.build().with_cause(|| "cannot set up the Hugging Face hub client".into())?.repo(repo.clone()))
        };
        Ok(Self { id: id.to_string(), revision: revision.to_string(), offline, repo, api })
    }

    /// The local path of `file` (downloaded if needed), `None` if the repository has no such file.
    pub fn get(&self, file: &str) -> Result<Option<PathBuf>> {
        let Some(api) = &self.api else {
            return Ok(hf_hub::Cache::from_env().repo(self.repo.clone()).get(file));
        };
        // As ApiRepo::get (the cache first), with progress a notebook can show.
        if let Some(p) = hf_hub::Cache::from_env().repo(self.repo.clone()).get(file) {
            return Ok(Some(p));
        }
        match api.download_with_progress(file, crate::progress::Progress::new(file, None, "bytes")) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(anyhow::anyhow!("downloading {file} of {}@{} failed: {e}; run again to resume", self.id, self.revision)),
        }
    }

    /// The same repository through the cache only (as with `HF_HUB_OFFLINE=1`).
    pub fn cache_only(mut self) -> Self {
        self.api = None;
        self.offline = true;
        self
    }

    /// Every file of the repository at this revision (the hub's file list; offline, the files the
    /// cache holds for it).
    pub fn list(&self) -> Result<Vec<String>> {
        let Some(api) = &self.api else {
            let base = hf_hub::Cache::from_env().path().join(self.repo.folder_name());
            let commit = std::fs::read_to_string(base.join("refs").join(&self.revision)).unwrap_or_else(|_| self.revision.clone());
            let snapshot = base.join("snapshots").join(commit.trim());
            let mut out = Vec::new();
            walk(&snapshot, &snapshot, &mut out);
            out.sort();
            return Ok(out);
        };
        let info = api.info().map_err(|e| anyhow::anyhow!("cannot list the files of {}@{} on the hub: {e}", self.id, self.revision))?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

fn weight_files_listed(index: &Path) -> Result<Vec<String>> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(index)?).with_cause(|| format!("{} is not JSON", index.display()))?;
    let map = v.get("weight_map").and_then(Value::as_object).with_context(|| format!("{} has no weight_map", index.display()))?;
    let mut files: Vec<String> = map.values().filter_map(Value::as_str).map(String::from).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Reads `<dir>/config.json` (an OLMoE config) into the notebook's `ModelConfig`, whose fields use
/// the Hugging Face names. Options plain OLMoE lacks (shared experts, dense layers) come out as 0.
pub fn model_config<T: DeserializeOwned>(dir: impl AsRef<Path>) -> Result<T> {
    let path = dir.as_ref().join("config.json");
    let text = std::fs::read_to_string(&path).with_cause(|| format!("cannot read {}", path.display()))?;
    let c: Value = serde_json::from_str(&text).with_cause(|| format!("{} is not JSON", path.display()))?;
    let get = |k: &str| c.get(k).filter(|v| !v.is_null());
    let model_type = get("model_type").and_then(Value::as_str).unwrap_or("?");
    ensure!(model_type == "olmoe", "{}: model_type is {model_type:?}, expected \"olmoe\"", path.display());
    let heads = get("num_attention_heads").cloned().unwrap_or(Value::Null);
    if let Some(kv) = get("num_key_value_heads") {
        ensure!(kv == &heads, "{}: num_key_value_heads {kv} != num_attention_heads {heads}: grouped-query attention is not supported", path.display());
    }
    ensure!(get("clip_qkv").is_none(), "{}: clip_qkv is set; this model has no QKV clipping", path.display());
    ensure!(!get("attention_bias").and_then(Value::as_bool).unwrap_or(false), "{}: attention_bias is true; this model has no attention biases", path.display());
    ensure!(!get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false), "{}: tie_word_embeddings is true; OLMoE's LM head is untied", path.display());
    // transformers 5.x nests rope_theta in rope_parameters; the hub's config has it at the top.
    let rope_theta = get("rope_theta")
        .or_else(|| c.get("rope_parameters").and_then(|r| r.get("rope_theta")))
        .cloned()
        .unwrap_or(json!(10000.0));
    let need = |k: &str| get(k).cloned().with_context(|| format!("{}: missing {k}", path.display()));
    let v = json!({
        "vocab_size": need("vocab_size")?,
        "hidden_size": need("hidden_size")?,
        "num_hidden_layers": need("num_hidden_layers")?,
        "num_attention_heads": heads,
        "num_experts": need("num_experts")?,
        "num_experts_per_tok": need("num_experts_per_tok")?,
        "intermediate_size": need("intermediate_size")?,
        "n_shared_experts": get("n_shared_experts").cloned().unwrap_or(json!(0)),
        "n_dense_layers": get("n_dense_layers").cloned().unwrap_or(json!(0)),
        "dense_intermediate_size": get("dense_intermediate_size").cloned().unwrap_or(json!(0)),
        "norm_topk_prob": get("norm_topk_prob").cloned().unwrap_or(json!(false)),
        "rms_norm_eps": get("rms_norm_eps").cloned().unwrap_or(json!(1e-5)),
        "rope_theta": rope_theta,
        "max_position_embeddings": get("max_position_embeddings").cloned().unwrap_or(json!(4096)),
        "initializer_range": get("initializer_range").cloned().unwrap_or(json!(0.02)),
    });
    serde_json::from_value(v).with_cause(|| format!("{}: does not fit the notebook's ModelConfig", path.display()))
}

/// The safetensors files of a checkpoint directory: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
pub fn weight_files(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    ensure!(index.is_file(), "{} has neither model.safetensors nor model.safetensors.index.json", dir.display());
    Ok(weight_files_listed(&index)?.into_iter().map(|f| dir.join(f)).collect())
}

/// Reads every tensor of the checkpoint, stacking per-expert tensors (the hub's OLMoE layout) into
/// `mlp.experts.gate_up_proj` (E, 2I, D) and `mlp.experts.down_proj` (E, D, I).
pub fn read_tensors(dir: impl AsRef<Path>) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    // prefix ("model.layers.3.mlp") -> expert -> part ("gate_proj", "up_proj", "down_proj") -> (out, in)
    let mut experts: BTreeMap<String, BTreeMap<i64, BTreeMap<String, Tensor>>> = BTreeMap::new();
    for file in weight_files(&dir)? {
        for (name, t) in read_file(&file)? {
            match per_expert_name(&name) {
                Some((prefix, j, part)) => {
                    experts.entry(prefix).or_default().entry(j).or_default().insert(part, t);
                }
                None => {
                    out.insert(name, t);
                }
            }
        }
    }
    for (prefix, by_expert) in experts {
        let n = by_expert.len() as i64;
        ensure!(by_expert.keys().copied().eq(0..n), "{prefix}: the checkpoint's experts are not numbered 0..{n}");
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for (j, parts) in by_expert {
            let get = |p: &str| parts.get(p).with_context(|| format!("{prefix}.experts.{j}.{p}.weight is missing from the checkpoint"));
            gate_up.push(Tensor::cat(&[get("gate_proj")?, get("up_proj")?], 0)); // (2I, D), gate rows first
            down.push(get("down_proj")?.shallow_clone()); // (D, I)
        }
        out.insert(format!("{prefix}.experts.gate_up_proj"), Tensor::stack(&gate_up, 0));
        out.insert(format!("{prefix}.experts.down_proj"), Tensor::stack(&down, 0));
    }
    Ok(out)
}

/// The tensors of one safetensors file, memory-mapped (the `safetensors` crate): each tensor is
/// copied once out of the page cache, and the file is never read whole into memory (tch's
/// `read_safetensors` reads it all first, twice the checkpoint's size at the peak).
pub fn read_file(file: &Path) -> Result<Vec<(String, Tensor)>> {
    let f = std::fs::File::open(file).with_cause(|| format!("cannot open {}", file.display()))?;
    // SAFETY: the map is read-only and dropped before returning; a checkpoint changed on disk while
    // it is read is the caller's race, as with any reader.
    let map = unsafe { memmap2::Mmap::map(&f) }.with_cause(|| format!("cannot map {}", file.display()))?;
    let st = safetensors::SafeTensors::deserialize(&map).with_cause(|| format!("{} is not a safetensors file", file.display()))?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = Tensor::try_from(view).with_cause(|| format!("{}: tensor {name}", file.display()))?;
            Ok((name, t))
        })
        .collect()
}

/// The largest shard an export writes before splitting (transformers' `max_shard_size="5GB"`).
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// One contiguous CPU tensor as the safetensors writer sees it (borrowed, not copied).
struct Bytes<'a> {
    tensor: &'a Tensor,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    len: usize,
}

impl<'a> Bytes<'a> {
    fn new(name: &str, tensor: &'a Tensor) -> Result<Self> {
        ensure!(tensor.device() == tch::Device::Cpu && tensor.is_contiguous(), "{name}: only contiguous CPU tensors are written");
        let dtype = safetensors::Dtype::try_from(tensor.kind()).with_cause(|| format!("{name}: no safetensors dtype for {:?}", tensor.kind()))?;
        let len = tensor.numel() * tensor.kind().elt_size_in_bytes();
        Ok(Self { tensor, dtype, shape: tensor.size().iter().map(|&d| d as usize).collect(), len })
    }
}

impl safetensors::View for &Bytes<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.len == 0 {
            return std::borrow::Cow::Borrowed(&[]);
        }
        // SAFETY: a contiguous CPU tensor (checked in `new`) owns `len` bytes at data_ptr, and it
        // outlives this borrow.
        std::borrow::Cow::Borrowed(unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, self.len) })
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

/// Writes `named` (contiguous CPU tensors) into `dir` as transformers does: `model.safetensors`, or,
/// past `max_shard_bytes`, shards `model-00001-of-0000N.safetensors` and the index
/// `model.safetensors.index.json`; every file's header carries `{"format": "pt"}`. Each file is
/// written to a temporary name and renamed; the other form's files from an earlier export are
/// removed, so the directory never holds both. Returns the files written.
pub fn write_weights(dir: &Path, named: &[(String, Tensor)], max_shard_bytes: u64) -> Result<Vec<PathBuf>> {
    let views: Vec<(&str, Bytes)> = named.iter().map(|(n, t)| Ok((n.as_str(), Bytes::new(n, t)?))).collect::<Result<_>>()?;
    let mut shards: Vec<Vec<&(&str, Bytes)>> = vec![Vec::new()];
    let mut size = 0u64;
    for v in &views {
        let n = v.1.len as u64;
        if size + n > max_shard_bytes && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().unwrap().push(v);
    }
    let metadata = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
    let single = shards.len() == 1;
    let names: Vec<String> = if single {
        vec!["model.safetensors".into()]
    } else {
        (1..=shards.len()).map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len())).collect()
    };
    // The other form, from an earlier export into this directory.
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        for f in weight_files_listed(&index)? {
            if !names.contains(&f) {
                let _ = std::fs::remove_file(dir.join(f));
            }
        }
        std::fs::remove_file(&index).with_cause(|| format!("cannot remove {}", index.display()))?;
    }
    if !single {
        let _ = std::fs::remove_file(dir.join("model.safetensors"));
    }
    let mut written = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (shard, name) in shards.iter().zip(&names) {
        let tmp = dir.join(format!(".{name}.tmp"));
        safetensors::tensor::serialize_to_file(shard.iter().map(|(n, b)| (*n, b)), &metadata, &tmp)
            .with_cause(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(name)).with_cause(|| format!("cannot rename {}", tmp.display()))?;
        for (n, _) in shard {
            weight_map.insert(n.to_string(), json!(name));
        }
        written.push(dir.join(name));
    }
    if !single {
        let total: u64 = views.iter().map(|v| v.1.len as u64).sum();
        let index_json = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        crate::run::write_atomic(&index, serde_json::to_string_pretty(&index_json)?.as_bytes())?;
    }
    Ok(written)
}

/// `model.layers.3.mlp.experts.5.gate_proj.weight` -> ("model.layers.3.mlp", 5, "gate_proj").
fn per_expert_name(name: &str) -> Option<(String, i64, String)> {
    let (prefix, rest) = name.split_once(".experts.")?;
    let (j, rest) = rest.split_once('.')?;
    let part = rest.strip_suffix(".weight")?;
    let j = j.parse::<i64>().ok()?;
    ["gate_proj", "up_proj", "down_proj"].contains(&part).then(|| (prefix.to_string(), j, part.to_string()))
}

/// Copies the checkpoint in `dir` into the variables of `vs` (converting dtypes to the variables').
/// Every variable must be covered and every checkpoint tensor used, with equal shapes.
pub fn load_weights(dir: impl AsRef<Path>, vs: &VarStore) -> Result<usize> {
    let dir = dir.as_ref();
    let ckpt: std::collections::HashMap<String, Tensor> = read_tensors(dir)?.into_iter().collect();
    let vars = vs.variables();
    // Buffers (non-trainable variables such as the LFLB bias) that the checkpoint lacks keep their
    // initial values; every trainable parameter must be there.
    let mut missing: Vec<&String> = vars.iter().filter(|(k, v)| v.requires_grad() && crate::placement::lookup(&ckpt, k).is_none()).map(|(k, _)| k).collect();
    missing.sort();
    if !missing.is_empty() {
        bail!("{}: the checkpoint lacks {} parameter(s) of the model, e.g. {:?}", dir.display(), missing.len(), &missing[..missing.len().min(5)]);
    }
    let used: std::collections::HashSet<String> = crate::placement::sources(vars.keys().map(|k| k.as_str())).into_iter().collect();
    let mut unknown: Vec<&String> = ckpt.keys().filter(|k| !used.contains(*k)).collect();
    unknown.sort();
    if !unknown.is_empty() {
        bail!("{}: the checkpoint has {} tensor(s) the model does not, e.g. {:?}", dir.display(), unknown.len(), &unknown[..unknown.len().min(5)]);
    }
    tch::no_grad(|| -> Result<()> {
        for (name, var) in &vars {
            let Some(src) = crate::placement::lookup(&ckpt, name) else { continue };
            ensure!(src.size() == var.size(), "{name}: checkpoint shape {:?} != model shape {:?}", src.size(), var.size());
            var.shallow_clone().copy_(&src.to_kind(var.kind()).to_device(var.device()));
        }
        Ok(())
    })?;
    Ok(vars.len())
}

/// Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` and
/// `AutoTokenizer.from_pretrained` load with no extra code: `config.json` (`model_type: olmoe`),
/// `model.safetensors` (stacked experts, transformers 5.x's layout), `generation_config.json`, and the
/// tokenizer (`tokenizer.json` + `tokenizer_config.json`).
///
/// `model_config` is the notebook's `ModelConfig` (serialised); `aux_loss_coef` is recorded as
/// `router_aux_loss_coef`. Models plain OLMoE cannot express are refused, never exported wrong:
/// shared experts, dense layers, an LFLB bias, or any tensor whose name transformers would not load.
pub fn export(dir: impl AsRef<Path>, weights: &[(String, Tensor)], model_config: &impl serde::Serialize, tokenizer_json: impl AsRef<Path>, aux_loss_coef: f64) -> Result<PathBuf> {
    export_with_shard_size(dir, weights, model_config, tokenizer_json, aux_loss_coef, MAX_SHARD_BYTES)
}

/// [`export`] with weight files of at most `max_shard_bytes` each (transformers' `max_shard_size`):
/// above it, `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json`.
pub fn export_with_shard_size(dir: impl AsRef<Path>, weights: &[(String, Tensor)], model_config: &impl serde::Serialize, tokenizer_json: impl AsRef<Path>, aux_loss_coef: f64, max_shard_bytes: u64) -> Result<PathBuf> {
    let dir = dir.as_ref();
    let m = serde_json::to_value(model_config)?;
    let num = |k: &str| m.get(k).and_then(Value::as_i64).unwrap_or(0);
    ensure!(num("n_shared_experts") == 0, "Hugging Face export refused: OLMoE has no shared experts (this model has {}); transformers would load it without them", num("n_shared_experts"));
    ensure!(num("n_dense_layers") == 0, "Hugging Face export refused: OLMoE has no dense layers (this model has {}); transformers would expect an MoE in every block", num("n_dense_layers"));
    // Placed experts' shards become whole stacks.
    let vars: BTreeMap<String, Tensor> = crate::placement::gather(weights.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect())?.into_iter().collect();
    if vars.keys().any(|k| k.ends_with(".lflb_bias")) {
        bail!("Hugging Face export refused: the loss-free balancing bias changes which experts are chosen, and transformers' OLMoE has no such bias");
    }
    if let Some(odd) = vars.keys().find(|k| !is_olmoe_name(k)) {
        bail!("Hugging Face export refused: parameter {odd} has no place in an OLMoE checkpoint");
    }
    std::fs::create_dir_all(dir).with_cause(|| format!("cannot create {}", dir.display()))?;
    let tok = crate::data::Tokenizer::from_file(tokenizer_json.as_ref())?;
    let config = json!({
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "vocab_size": m["vocab_size"], "hidden_size": m["hidden_size"], "intermediate_size": m["intermediate_size"],
        "num_hidden_layers": m["num_hidden_layers"], "num_attention_heads": m["num_attention_heads"],
        "num_key_value_heads": m["num_attention_heads"], "num_experts": m["num_experts"],
        "num_experts_per_tok": m["num_experts_per_tok"], "norm_topk_prob": m["norm_topk_prob"],
        "rms_norm_eps": m["rms_norm_eps"], "rope_theta": m["rope_theta"],
        "max_position_embeddings": m["max_position_embeddings"], "initializer_range": m["initializer_range"],
        "hidden_act": "silu", "attention_bias": false, "attention_dropout": 0.0, "clip_qkv": null,
        "tie_word_embeddings": false, "output_router_logits": false, "router_aux_loss_coef": aux_loss_coef,
        "pad_token_id": tok.inner.token_to_id("<|padding|>").unwrap_or(1), "eos_token_id": tok.eos_id, "bos_token_id": null,
        "torch_dtype": "float32", "use_cache": true,
    });
    crate::run::write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    let generation = json!({ "eos_token_id": tok.eos_id, "pad_token_id": config["pad_token_id"], "bos_token_id": null });
    crate::run::write_atomic(&dir.join("generation_config.json"), serde_json::to_string_pretty(&generation)?.as_bytes())?;
    // fp32, as config.json says (mixed-precision runs pass their fp32 master weights).
    let named: Vec<(String, Tensor)> = vars.into_iter().map(|(n, t)| (n, t.detach().to_device(tch::Device::Cpu).to_kind(tch::Kind::Float).contiguous())).collect();
    write_weights(dir, &named, max_shard_bytes)?;
    std::fs::copy(tokenizer_json.as_ref(), dir.join("tokenizer.json"))
        .with_cause(|| format!("cannot copy {}", tokenizer_json.as_ref().display()))?;
    let tok_config = json!({
        "tokenizer_class": "GPTNeoXTokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>",
        "bos_token": null, "unk_token": null, "add_bos_token": false, "add_eos_token": false,
        "model_max_length": m["max_position_embeddings"], "clean_up_tokenization_spaces": false,
    });
    crate::run::write_atomic(&dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&tok_config)?.as_bytes())?;
    Ok(dir.to_path_buf())
}

fn is_olmoe_name(name: &str) -> bool {
    const TOP: [&str; 3] = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"];
    const LAYER: [&str; 11] = [
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
        "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate.weight",
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj",
    ];
    if TOP.contains(&name) {
        return true;
    }
    let Some(rest) = name.strip_prefix("model.layers.") else { return false };
    let Some((l, rest)) = rest.split_once('.') else { return false };
    if l.parse::<u32>().is_err() {
        return false;
    }
    LAYER.contains(&rest)
}
