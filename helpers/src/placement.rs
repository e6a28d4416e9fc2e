//! Expert placement on one node (interpretable-moes' scheme): whole experts spread over devices by
//! a per-expert device list; dense parts, router and shared experts stay on the primary device.
//! The notebook's MoE layer moves each expert's token slice to the expert's device and back.
use anyhow::{bail, ensure, Result};
use tch::Device;

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
}
