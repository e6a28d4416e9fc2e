//! Expert placement on one node (interpretable-moes' scheme): whole experts spread over devices by
//! a per-expert device list; dense parts, router and shared experts stay on the primary device.
//! The notebook's MoE layer moves each device's token rows to its experts and back.
//!
//! Experts are stacked (`...mlp.experts.gate_up_proj`, (E, 2I, D)), so a placed layer holds one
//! *shard* of the stack per device: the rows of its experts, a variable named with their ids,
//! `...mlp.experts[0,2,4].gate_up_proj` ([`shard_name`]). Checkpoints and exports always hold the
//! whole stack: [`gather`] assembles shards into it, [`lookup`] cuts a shard out of it, so a run
//! resumes under another placement and an export never sees shards.
use anyhow::{bail, ensure, Result};
use std::collections::{BTreeMap, HashMap};
use tch::{Device, Tensor};

/// How experts are assigned to devices.
#[derive(Clone, Debug, PartialEq)]
pub enum Strategy {
    /// Blocks of consecutive experts, as equal as possible (device 0 gets experts 0..E/n).
    Contiguous,
    /// Expert e on device e mod n.
    RoundRobin,
    /// Contiguous blocks sized in proportion to each device's free memory (bytes, one per device).
    ByFreeMemory(Vec<f64>),
}

/// The device of each of `n_experts` experts over `devices` (validated).
pub fn expert_map(n_experts: usize, devices: &[Device], strategy: &Strategy) -> Result<Vec<Device>> {
    ensure!(!devices.is_empty(), "no devices to place experts on");
    ensure!(n_experts > 0, "no experts to place");
    let n = devices.len();
    let map: Vec<Device> = match strategy {
        Strategy::RoundRobin => (0..n_experts).map(|e| devices[e % n]).collect(),
        Strategy::Contiguous => blocks(n_experts, &vec![1.0; n]).into_iter().map(|d| devices[d]).collect(),
        Strategy::ByFreeMemory(free) => {
            ensure!(free.len() == n, "{} free-memory figures for {n} devices", free.len());
            ensure!(free.iter().all(|f| *f >= 0.0) && free.iter().sum::<f64>() > 0.0, "free memory must be non-negative and not all zero: {free:?}");
            blocks(n_experts, free).into_iter().map(|d| devices[d]).collect()
        }
    };
    validate(&map, n_experts)?;
    Ok(map)
}

/// Splits `n` items into contiguous blocks proportional to `weights` (largest remainders), and
/// returns the block index of each item.
fn blocks(n: usize, weights: &[f64]) -> Vec<usize> {
    let total: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| w / total * n as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).partial_cmp(&(exact[a] - exact[a].floor())).unwrap().then(a.cmp(&b)));
    let mut left = n - counts.iter().sum::<usize>();
    for &d in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[d] += 1;
        left -= 1;
    }
    counts.iter().enumerate().flat_map(|(d, &c)| std::iter::repeat_n(d, c)).collect()
}

/// Checks a map: one entry per expert, and every device exists on this machine.
pub fn validate(map: &[Device], n_experts: usize) -> Result<()> {
    ensure!(map.len() == n_experts, "the expert map has {} entries but the model has {n_experts} experts per layer", map.len());
    let n_cuda = tch::Cuda::device_count().max(0) as usize;
    for (e, d) in map.iter().enumerate() {
        match d {
            Device::Cpu => {}
            Device::Cuda(i) if *i < n_cuda => {}
            Device::Cuda(i) => bail!("expert {e} is mapped to cuda:{i}, but this machine has {n_cuda} CUDA device(s)"),
            other => bail!("expert {e} is mapped to {other:?}, which the notebook does not support (use cpu or cuda:N)"),
        }
    }
    Ok(())
}

/// Free memory of a device now, in bytes: the driver's figure for a GPU, the host's available
/// memory for the CPU.
pub fn free_memory(device: Device) -> Result<f64> {
    Ok(match device {
        Device::Cuda(i) => crate::memory::cuda_mem_info(i)?.0 as f64,
        _ => crate::memory::host_available_bytes()? as f64,
    })
}

/// Parses a map spec: `contiguous:cuda:0,cuda:1`, `round-robin:cuda:0,cpu`,
/// `by-free-memory:cuda:0,cuda:1` (blocks in proportion to each device's free memory now), or an
/// explicit list with one device per expert (`cuda:0,cuda:0,cuda:1,...`).
pub fn parse(spec: &str, n_experts: usize) -> Result<Vec<Device>> {
    let (strategy, list) = match spec.split_once(':') {
        Some((s @ ("contiguous" | "round-robin" | "by-free-memory"), rest)) => (Some(s), rest),
        _ => (None, spec),
    };
    let n_cuda = tch::Cuda::device_count().max(0) as usize;
    let devices = list.split(',').map(|d| crate::runtime::parse_device(d, n_cuda)).collect::<Result<Vec<_>>>()?;
    match strategy {
        Some("contiguous") => expert_map(n_experts, &devices, &Strategy::Contiguous),
        Some("by-free-memory") => {
            let free = devices.iter().map(|d| free_memory(*d)).collect::<Result<Vec<_>>>()?;
            expert_map(n_experts, &devices, &Strategy::ByFreeMemory(free))
        }
        Some(_) => expert_map(n_experts, &devices, &Strategy::RoundRobin),
        None => {
            validate(&devices, n_experts)?;
            Ok(devices)
        }
    }
}

/// The experts of each device in a map, in order of first appearance: `(device, expert ids)`.
pub fn shards(map: &[Device]) -> Vec<(Device, Vec<i64>)> {
    let mut out: Vec<(Device, Vec<i64>)> = Vec::new();
    for (e, d) in map.iter().enumerate() {
        match out.iter_mut().find(|(x, _)| x == d) {
            Some((_, ids)) => ids.push(e as i64),
            None => out.push((*d, vec![e as i64])),
        }
    }
    out
}

/// The name of the shard holding rows `ids` of the stacked tensor `name`, which must contain
/// `.experts.`: `model.layers.1.mlp.experts.gate_up_proj` -> `model.layers.1.mlp.experts[0,2].gate_up_proj`.
pub fn shard_name(name: &str, ids: &[i64]) -> String {
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    name.replacen(".experts.", &format!(".experts[{}].", ids.join(",")), 1)
}

/// The whole tensor's name and the rows of a shard name (`None` for any other name). Works on
/// any name with the shard inside, so optimizer state (`exp_avg.<shard name>`) maps the same way.
pub fn parse_shard_name(name: &str) -> Option<(String, Vec<i64>)> {
    let start = name.find(".experts[")? + ".experts".len();
    let end = start + name[start..].find(']')?;
    let ids = name[start + 1..end].split(',').map(|i| i.parse::<i64>().ok()).collect::<Option<Vec<_>>>()?;
    Some((format!("{}{}", &name[..start], &name[end + 1..]), ids))
}

/// Named tensors with every set of shards replaced by the whole stack (on the CPU, rows in expert
/// order); other tensors pass through. What checkpoints and exports save.
pub fn gather(named: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    let mut stacks: BTreeMap<String, Vec<(Vec<i64>, Tensor)>> = BTreeMap::new();
    for (name, t) in named {
        match parse_shard_name(&name) {
            Some((whole, ids)) => stacks.entry(whole).or_default().push((ids, t)),
            None => out.push((name, t)),
        }
    }
    for (name, parts) in stacks {
        let n: usize = parts.iter().map(|(ids, _)| ids.len()).sum();
        let mut size = parts[0].1.size();
        size[0] = n as i64;
        let whole = Tensor::zeros(size.as_slice(), (parts[0].1.kind(), Device::Cpu));
        let mut seen = vec![false; n];
        for (ids, t) in &parts {
            for &i in ids {
                ensure!((i as usize) < n && !seen[i as usize], "shards of {name} do not cover experts 0..{n} once each");
                seen[i as usize] = true;
            }
            let _ = tch::no_grad(|| whole.shallow_clone().index_copy_(0, &Tensor::from_slice(ids), &t.detach().to_device(Device::Cpu)));
        }
        out.push((name, whole));
    }
    Ok(out)
}

/// The tensor for `name` from saved (whole-stack) tensors: itself, or for a shard name the rows of
/// its experts cut from the whole stack. `None` if neither is there.
pub fn lookup(saved: &HashMap<String, Tensor>, name: &str) -> Option<Tensor> {
    if let Some(t) = saved.get(name) {
        return Some(t.shallow_clone());
    }
    let (whole, ids) = parse_shard_name(name)?;
    let t = saved.get(&whole)?;
    Some(t.index_select(0, &Tensor::from_slice(&ids).to_device(t.device())))
}

/// The saved names that [`lookup`] reads for `names` (to report saved tensors nothing used).
pub fn sources<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    names.into_iter().map(|n| parse_shard_name(n).map_or_else(|| n.to_string(), |(w, _)| w)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_balanced_contiguous_round_robin_or_proportional() {
        let (c, x) = (Device::Cpu, Device::Cpu);
        assert_eq!(expert_map(5, &[c, x], &Strategy::RoundRobin).unwrap().len(), 5);
        assert_eq!(blocks(5, &[1.0, 1.0]), vec![0, 0, 0, 1, 1]);
        assert_eq!(blocks(8, &[3.0, 1.0]), vec![0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(blocks(64, &[1.0, 1.0, 2.0]).iter().filter(|&&d| d == 2).count(), 32);
        assert_eq!(blocks(3, &[0.0, 1.0]), vec![1, 1, 1]);
        assert!(expert_map(4, &[c], &Strategy::ByFreeMemory(vec![1.0, 2.0])).unwrap_err().to_string().contains("2 free-memory figures for 1 devices"));
    }

    #[test]
    fn bad_maps_are_clear_errors() {
        assert!(validate(&[Device::Cpu; 3], 4).unwrap_err().to_string().contains("3 entries but the model has 4 experts"));
        let n = tch::Cuda::device_count();
        let e = validate(&[Device::Cpu, Device::Cuda(n as usize)], 2).unwrap_err().to_string();
        assert!(e.contains(&format!("expert 1 is mapped to cuda:{n}, but this machine has {n} CUDA device(s)")), "{e}");
        assert_eq!(parse("round-robin:cpu", 3).unwrap(), vec![Device::Cpu; 3]);
        assert_eq!(parse("cpu,cpu", 2).unwrap(), vec![Device::Cpu; 2]);
        assert_eq!(parse("by-free-memory:cpu,cpu", 4).unwrap(), vec![Device::Cpu; 4]);
        assert!(free_memory(Device::Cpu).unwrap() > 0.0);
        assert!(parse("cpu,cpu", 3).is_err());
        assert!(parse("contiguous:tpu:0", 2).is_err());
    }

    #[test]
    fn shards_gather_into_the_whole_stack_and_are_cut_from_it() {
        let c = Device::Cpu;
        assert_eq!(shards(&[c, c, c]), vec![(c, vec![0, 1, 2])]);
        let name = "model.layers.1.mlp.experts.gate_up_proj";
        assert_eq!(shard_name(name, &[0, 2]), "model.layers.1.mlp.experts[0,2].gate_up_proj");
        assert_eq!(parse_shard_name(&format!("exp_avg.{}", shard_name(name, &[3]))), Some((format!("exp_avg.{name}"), vec![3])));
        assert_eq!(parse_shard_name(name), None);
        let whole = Tensor::arange(3 * 2 * 2, (tch::Kind::Float, c)).view([3, 2, 2]);
        let even = whole.index_select(0, &Tensor::from_slice(&[0i64, 2]));
        let odd = whole.get(1).unsqueeze(0);
        let gathered = gather(vec![(shard_name(name, &[1]), odd), ("other".into(), Tensor::from(1f32)), (shard_name(name, &[0, 2]), even.shallow_clone())]).unwrap();
        let g: HashMap<String, Tensor> = gathered.into_iter().collect();
        assert!(g[name].equal(&whole) && g.contains_key("other") && g.len() == 2);
        assert!(lookup(&g, &shard_name(name, &[0, 2])).unwrap().equal(&even));
        assert!(lookup(&g, name).unwrap().equal(&whole));
        assert!(lookup(&g, "missing").is_none());
        assert_eq!(sources([shard_name(name, &[1]).as_str(), "x"]), vec![name.to_string(), "x".to_string()]);
        let overlap = gather(vec![(shard_name(name, &[0, 1]), even.shallow_clone()), (shard_name(name, &[1]), whole.get(1).unsqueeze(0))]);
        assert!(overlap.unwrap_err().to_string().contains("do not cover experts 0..3 once each"));
    }
}
