//! The CUDA library must be in the process after `runtime::init`, or a GPU pod silently trains on
//! CPU. This is its own test binary so nothing else has called `init` before the first check.
#[test]
fn init_dlopens_libtorch_cuda() {
    let before = helpers::runtime::cuda_library_loaded();
    let rt = helpers::runtime::init().unwrap();
    let wheel_has_cuda = helpers::runtime::libtorch_dir().unwrap().join("libtorch_cuda.so").exists();
    println!("before init: loaded={before}; after: {rt}");
    if wheel_has_cuda {
        // --as-needed linking drops the library from this binary, exactly as in a notebook cell.
        assert!(!before, "libtorch_cuda was already linked in; the test no longer checks the dlopen");
        assert!(helpers::runtime::cuda_library_loaded(), "{rt}");
    }
    assert!(rt.threads >= 1);
}
