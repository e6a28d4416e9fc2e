//! Device memory is read through the CUDA runtime libtorch loaded (`memory::cuda_mem_info`). On a
//! GPU the figures must move with an allocation; without one the call must fail with the runtime's
//! reason, not crash or invent numbers.
use tch::{Device, Kind, Tensor};

#[test]
fn cuda_memory_comes_from_libtorchs_runtime_or_a_clear_error() {
    let wheel_has_cuda = helpers::runtime::libtorch_dir().unwrap().join("libtorch_cuda.so").exists();
    helpers::runtime::init().unwrap();
    let n_gpus = tch::Cuda::device_count();
    let info = helpers::memory::cuda_mem_info(0);
    println!("{n_gpus} GPU(s); cuda_mem_info(0) = {info:?}");
    if n_gpus > 0 {
        let (free, total) = info.unwrap();
        assert!(total > 1 << 30 && free <= total, "free {free}, total {total}");
        // 1 GiB through libtorch's caching allocator: the driver's free memory drops by at least that.
        let x = Tensor::ones([1 << 28], (Kind::Float, Device::Cuda(0)));
        tch::Cuda::synchronize(0);
        let (free_after, _) = helpers::memory::cuda_mem_info(0).unwrap();
        assert!(free - free_after >= 1 << 30, "free {free} -> {free_after} after a 1 GiB tensor");
        assert_eq!(x.sum(Kind::Double).double_value(&[]), (1u64 << 28) as f64);
        assert!(helpers::memory::cuda_mem_info(n_gpus as usize).is_err(), "cuda:{n_gpus} does not exist");
    } else if wheel_has_cuda {
        let e = info.unwrap_err().to_string();
        assert!(e.starts_with("cuda:0: cudaGetDevice failed: ") && e.contains("(error "), "{e}");
    }
}
