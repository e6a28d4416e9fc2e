//! An rpath to libtorch for this crate's own binaries (unit and integration tests, examples):
//! tch's build puts one only on tch's own binaries, so without it `cargo test` would need
//! LD_LIBRARY_PATH. The CUDA library is NOT force-linked here on purpose: `runtime::init` dlopens
//! it, which is the only thing that works for notebook cells, and the tests check that path.
fn main() {
    // file!(), not "build.rs": programs build helpers from a generated manifest in another folder
    // (helpers/program), where a relative path would name a missing file and rebuild every time.
    println!("cargo:rerun-if-changed={}", file!());
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
