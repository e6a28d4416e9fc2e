//! 1. An rpath to libtorch for this crate's own binaries (unit and integration tests, examples):
//!    tch's build puts one only on tch's own binaries, so without it `cargo test` would need
//!    LD_LIBRARY_PATH. The CUDA library is NOT force-linked here on purpose: `runtime::init` dlopens
//!    it, which is the only thing that works for notebook cells, and the tests check that path.
//! 2. The C++ side of `helpers::dist` (csrc/dist.cpp: PyTorch's c10d, Gloo), compiled against the
//!    headers of the libtorch tch links, as torch-sys compiles its own wrapper.
fn main() {
    // The crate's own folder, and every path below absolute: a program's generated manifest (in
    // another folder, see helpers/program) names this file by its absolute path, so file!() is
    // absolute there; in this workspace file!() is relative to the workspace root
    // ("helpers/build.rs") while cargo reads a relative rerun-if-changed against the package
    // ("helpers/helpers/build.rs", missing), which made every cargo command rebuild helpers.
    let this = std::path::Path::new(file!());
    let dir = if this.is_absolute() { this.parent().unwrap().to_path_buf() } else { std::env::var("CARGO_MANIFEST_DIR").unwrap().into() };
    println!("cargo:rerun-if-changed={}", dir.join("build.rs").display());
    let csrc = dir.join("csrc");
    println!("cargo:rerun-if-changed={}", csrc.join("dist.cpp").display());
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports the libtorch lib directory");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let include = std::path::Path::new(&lib).join("../include");
    cc::Build::new()
        .cpp(true)
        .file(csrc.join("dist.cpp"))
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // ProcessGroupGloo.hpp declares its class only with USE_C10D_GLOO and then includes 17
        // headers of pytorch/gloo (BSD licence) that the wheel does not ship: vendored here.
        .include(csrc.join("third_party"))
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .flag("-std=c++17")
        .warnings(false)
        .flag_if_supported("-w")
        .compile("moe_dist");
}
