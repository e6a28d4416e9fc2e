//! Loading libtorch, choosing the device and the number of threads.
//!
//! Call [`init`] once in the first cell of a notebook. It
//! 1. loads `libtorch_cuda.so` into the process (`dlopen`, `RTLD_GLOBAL`): a notebook cell is a
//!    cdylib linked with `--as-needed`, which drops the CUDA library because no symbol of it is
//!    referenced, and then `tch::Cuda::is_available()` is false even on a GPU pod;
//! 2. sets the intra-op thread count (`MOE_THREADS`, default: every core, divided among the ranks
//!    of a launch on this node, LOCAL_WORLD_SIZE);
//! 3. picks the device (`MOE_DEVICE` = `auto` | `cpu` | `cuda` | `cuda:N`, default `auto`: under a
//!    launch, each rank's `cuda:LOCAL_RANK`).
use crate::WithCause;
use anyhow::{bail, Context, Result};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use tch::Device;

const CUDA_LIB: &str = "libtorch_cuda.so";

/// What [`init`] found and chose.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The device tensors of the model and the batches go to.
    pub device: Device,
    /// Intra-op threads libtorch uses on CPU.
    pub threads: usize,
    /// Where `libtorch_cuda.so` was loaded from; `None` with a CPU-only libtorch.
    pub cuda_library: Option<PathBuf>,
    /// Why the CUDA library is absent or failed to load, when it is.
    pub cuda_note: Option<String>,
    /// Number of CUDA devices libtorch sees (0 on a CPU machine).
    pub cuda_devices: usize,
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "device {}, {} CPU threads, ", device_name(self.device), self.threads)?;
        match (&self.cuda_library, self.cuda_devices) {
            (Some(_), 0) => write!(f, "CUDA library loaded, no CUDA device visible"),
            (Some(_), n) => write!(f, "CUDA library loaded, {n} CUDA device(s)"),
            (None, _) => write!(f, "CUDA library not loaded ({})", self.cuda_note.as_deref().unwrap_or("?")),
        }
    }
}

/// A device as `MOE_DEVICE` spells it: `cpu`, `cuda:0`.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        d => format!("{d:?}").to_lowercase(),
    }
}

/// Loads the CUDA library, sets threads, picks the device. See the module docs.
pub fn init() -> Result<Runtime> {
    let (cuda_library, cuda_note) = match load_cuda_library() {
        Ok(p) => (p, None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let cuda_note = cuda_note.or_else(|| cuda_library.is_none().then(|| "CPU-only libtorch".to_string()));
    let threads = match std::env::var("MOE_THREADS") {
        Ok(s) => s.trim().parse::<usize>().ok().filter(|&n| n > 0).with_context(|| {
            format!("MOE_THREADS={s:?} is not a positive integer; unset it to use every core")
        })?,
        Err(_) => (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) / local_world()).max(1),
    };
    tch::set_num_threads(threads as i32);
    let cuda_devices = tch::Cuda::device_count().max(0) as usize;
    let mut device = parse_device(&std::env::var("MOE_DEVICE").unwrap_or_else(|_| "auto".into()), cuda_devices)?;
    if let (Device::Cuda(0), Some(local_rank)) = (device, std::env::var("LOCAL_RANK").ok().and_then(|s| s.parse::<usize>().ok())) {
        if matches!(std::env::var("MOE_DEVICE").as_deref(), Err(_) | Ok("auto") | Ok("cuda")) {
            device = parse_device(&format!("cuda:{local_rank}"), cuda_devices)?; // one GPU per rank
        }
    }
    if device.is_cuda() && cuda_library.is_none() {
        bail!("MOE_DEVICE asks for CUDA but libtorch_cuda.so is not loaded: {}", cuda_note.unwrap_or_default());
    }
    Ok(Runtime { device, threads, cuda_library, cuda_note, cuda_devices })
}

/// Processes of a launch on this node (torchrun's LOCAL_WORLD_SIZE), 1 without one.
fn local_world() -> usize {
    std::env::var("LOCAL_WORLD_SIZE").ok().and_then(|s| s.parse::<usize>().ok()).filter(|&n| n > 0).unwrap_or(1)
}

/// Parses `auto`, `cpu`, `cuda`, `cuda:N` against the number of visible CUDA devices.
pub fn parse_device(s: &str, cuda_devices: usize) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    let need = |i: usize| -> Result<Device> {
        if i < cuda_devices {
            Ok(Device::Cuda(i))
        } else if cuda_devices == 0 {
            bail!("device {s:?} requested but libtorch sees no CUDA device; use MOE_DEVICE=cpu or auto")
        } else {
            bail!("device {s:?} requested but only {cuda_devices} CUDA device(s) exist (cuda:0..cuda:{})", cuda_devices - 1)
        }
    };
    match s.as_str() {
        "auto" | "" => Ok(if cuda_devices > 0 { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => need(0),
        _ => match s.strip_prefix("cuda:").map(|i| i.parse::<usize>()) {
            Some(Ok(i)) => need(i),
            _ => bail!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N"),
        },
    }
}

/// True when `libtorch_cuda.so` is mapped into this process.
pub fn cuda_library_loaded() -> bool {
    let name = CString::new(CUDA_LIB).unwrap();
    // SAFETY: RTLD_NOLOAD only queries; the handle is released right away.
    unsafe {
        let h = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if h.is_null() {
            return false;
        }
        libc::dlclose(h);
    }
    true
}

/// dlopens `libtorch_cuda.so` from the directory libtorch itself was loaded from.
/// Ok(None) when that directory has no CUDA library (a CPU-only libtorch).
fn load_cuda_library() -> Result<Option<PathBuf>> {
    let dir = libtorch_dir().with_cause(|| "cannot find where libtorch is loaded from".into())?;
    let path = dir.join(CUDA_LIB);
    if !path.exists() {
        return Ok(None);
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: dlopen of a shared library with a valid C string; the handle is kept for the life
    // of the process on purpose (libtorch registers its CUDA hooks in static initialisers).
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let err = unsafe { libc::dlerror() };
        let msg = if err.is_null() { "unknown error".into() } else { unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned() };
        bail!("dlopen {} failed: {msg}", path.display());
    }
    Ok(Some(path))
}

/// The directory of the `libtorch_cpu.so` mapped into this process (read from /proc/self/maps).
pub fn libtorch_dir() -> Result<PathBuf> {
    // Touch libtorch so it is certainly loaded (it is: tch links it, but be explicit).
    let _ = tch::Cuda::is_available();
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
        .context("libtorch_cpu.so is not mapped into this process")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_line_says_what_applies() {
        let rt = |device, lib: Option<&str>, n| Runtime { device, threads: 2, cuda_library: lib.map(PathBuf::from), cuda_note: lib.is_none().then(|| "CPU-only libtorch".into()), cuda_devices: n };
        assert_eq!(rt(Device::Cpu, Some("/x/libtorch_cuda.so"), 0).to_string(), "device cpu, 2 CPU threads, CUDA library loaded, no CUDA device visible");
        assert_eq!(rt(Device::Cuda(0), Some("/x/libtorch_cuda.so"), 8).to_string(), "device cuda:0, 2 CPU threads, CUDA library loaded, 8 CUDA device(s)");
        assert_eq!(rt(Device::Cpu, None, 0).to_string(), "device cpu, 2 CPU threads, CUDA library not loaded (CPU-only libtorch)");
    }

    #[test]
    fn parses_devices() {
        assert_eq!(parse_device("cpu", 0).unwrap(), Device::Cpu);
        assert_eq!(parse_device("auto", 0).unwrap(), Device::Cpu);
        assert_eq!(parse_device("auto", 2).unwrap(), Device::Cuda(0));
        assert_eq!(parse_device("CUDA:1", 2).unwrap(), Device::Cuda(1));
        let e = parse_device("cuda:2", 2).unwrap_err().to_string();
        assert!(e.contains("only 2 CUDA device"), "{e}");
        assert!(parse_device("cuda", 0).unwrap_err().to_string().contains("no CUDA device"));
        assert!(parse_device("tpu", 0).unwrap_err().to_string().contains("unknown device"));
    }
}
