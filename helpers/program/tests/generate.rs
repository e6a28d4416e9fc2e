//! The notebook-to-program translation on hand-made notebooks: what goes into `main`, what into
//! Cargo.toml, and the errors a notebook that cannot be a program gets.
use moe_program::{generate, helpers_manifest, program_manifest, program_name, tch_for_torch};
use std::path::{Path, PathBuf};

/// Writes a notebook of (cell_type, source, tags) cells into `dir/name` and returns its path.
fn notebook(dir: &Path, name: &str, cells: &[(&str, &str, &[&str])]) -> PathBuf {
    let cells: Vec<serde_json::Value> =
        cells.iter().map(|(kind, src, tags)| serde_json::json!({ "cell_type": kind, "source": src, "metadata": { "tags": tags } })).collect();
    let p = dir.join(name);
    std::fs::write(&p, serde_json::json!({ "cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5 }).to_string()).unwrap();
    p
}

#[test]
fn cells_become_one_main_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("lib")).unwrap();
    let nb = notebook(
        tmp.path(),
        "experiment.ipynb",
        &[
            ("markdown", "## Setup", &[]),
            ("code", ":dep mylib = { path = \"lib\" }\n:dep anyhow = \"1\"\nuse std::fmt::Write;\nlet x = 2;", &[]),
            ("code", "use std::fmt::Write;\nfn double(v: i64) -> i64 { v * 2 }\nlet y = double(x);\ny + 1", &[]),
            ("code", "let z = 3;", &["no-program"]),
            ("code", "let w = 4;", &["train"]),
            ("code", "{ println!(\"block\"); }", &[]),
        ],
    );
    let p = generate(&nb, &["train".to_string()]).unwrap();
    let main = &p.main_rs;
    // Order kept, statements and items in one body; the tagged cells left out.
    let (ix, iy) = (main.find("let x = 2;").unwrap(), main.find("let y = double(x);").unwrap());
    assert!(ix < iy);
    assert!(main.contains("fn double(v: i64) -> i64"));
    assert!(!main.contains("let z = 3;") && !main.contains("let w = 4;"), "tagged cells must be left out:\n{main}");
    // A use repeated in a later cell is kept once (two in one body would not compile).
    assert_eq!(main.matches("use std::fmt::Write;").count(), 1, "{main}");
    // The trailing expression is displayed as the kernel would, a () block shows nothing.
    assert!(main.contains("__show_cell_value(&y + 1);") || main.contains("__show_cell_value(&y + 1)"), "{main}");
    assert!(main.contains("__show_cell_value(&{ println!(\"block\"); });"), "{main}");
    assert!(main.contains("section \"Setup\""));
    // The notebook's folder names the run's folder, as in the kernel (which runs in that folder).
    let folder = tmp.path().canonicalize().unwrap().file_name().unwrap().to_string_lossy().into_owned();
    assert!(main.contains(&format!("std::env::set_var(\"MOE_EXPERIMENT\", {folder:?})")), "{main}");
    // :dep lines: the dependencies, relative paths made absolute against the notebook's folder.
    let names: Vec<&str> = p.deps.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["mylib", "anyhow"]);
    let path = p.deps[0].1.get("path").unwrap().as_str().unwrap();
    assert_eq!(Path::new(path), tmp.path().join("lib").canonicalize().unwrap());
    assert_eq!(p.cells, vec![1, 2, 5]);
}

#[test]
fn a_trailing_expression_is_wrapped_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let nb = notebook(tmp.path(), "e.ipynb", &[("code", "let v = vec![1, 2];\nv.len() * 2 // the length\n", &[])]);
    let main = generate(&nb, &[]).unwrap().main_rs;
    assert!(main.contains("__show_cell_value(&v.len() * 2); // the length"), "{main}");
}

#[test]
fn notebooks_that_cannot_be_programs_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let nb = notebook(tmp.path(), "a.ipynb", &[("code", "fn f() {}", &[]), ("code", "fn f() {}", &[])]);
    let e = format!("{:#}", generate(&nb, &[]).unwrap_err());
    assert!(e.contains("code cell 2") && e.contains("redefines `f`"), "{e}");

    let nb = notebook(tmp.path(), "b.ipynb", &[("code", "let x = ;", &[])]);
    let e = format!("{:#}", generate(&nb, &[]).unwrap_err());
    assert!(e.contains("code cell 1") && e.contains("does not parse as Rust at its line 1"), "{e}");

    let nb = notebook(tmp.path(), "c.ipynb", &[("code", ":dep x = { path = \"missing\" }", &[])]);
    let e = format!("{:#}", generate(&nb, &[]).unwrap_err());
    assert!(e.contains("bad `:dep") && e.contains("does not exist"), "{e}");

    let e = format!("{:#}", generate(&tmp.path().join("none.ipynb"), &[]).unwrap_err());
    assert!(e.contains("cannot read notebook"), "{e}");
    // A fn and a struct of the same name live in different namespaces: allowed.
    let nb = notebook(tmp.path(), "d.ipynb", &[("code", "fn g() {}", &[]), ("code", "struct G; fn h() {}", &[])]);
    assert!(generate(&nb, &[]).is_ok());
}

#[test]
fn torch_versions_map_to_their_tch() {
    assert_eq!(tch_for_torch("2.13.0").unwrap(), "0.26.0");
    assert_eq!(tch_for_torch("2.11.0+cu130").unwrap(), "0.24.0");
    assert_eq!(tch_for_torch("2.10.0+cu128").unwrap(), "0.23.0");
    let e = tch_for_torch("2.12.0").unwrap_err().to_string();
    assert!(e.contains("torch 2.12.0 has no matching tch") && e.contains("torch 2.11.0 = tch 0.24.0"), "{e}");
}

#[test]
fn manifests_pin_one_tch() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().parent().unwrap();
    let helpers: toml::Table = helpers_manifest(root, "0.24.0").unwrap().parse().unwrap();
    assert_eq!(helpers["dependencies"]["tch"].as_str(), Some("=0.24.0"));
    assert_eq!(helpers["dependencies"]["torch-sys"].as_str(), Some("=0.24.0"));
    assert_eq!(helpers["package"]["edition"].as_str(), Some("2021"), "workspace fields are written out");
    assert!(helpers["lib"]["path"].as_str().unwrap().ends_with("helpers/src/lib.rs"));
    assert!(helpers.get("dev-dependencies").is_none());

    let deps = vec![("tch".to_string(), toml::Value::String("=0.26.0".into())), ("helpers".to_string(), toml::toml! { path = "" }.into())];
    let mut deps = deps;
    deps[1].1.as_table_mut().unwrap().insert("path".into(), root.join("helpers").display().to_string().into());
    let m: toml::Table = program_manifest("base-olmoe", &deps, Path::new("/x/helpers"), "0.24.0", root).unwrap().parse().unwrap();
    assert_eq!(m["dependencies"]["tch"].as_str(), Some("=0.24.0"));
    assert_eq!(m["dependencies"]["helpers"]["path"].as_str(), Some("/x/helpers"));
    assert_eq!(m["package"]["name"].as_str(), Some("program-base-olmoe"));
    // The project's profiles, so the program reuses setup's build of every dependency; its own
    // code optimised.
    assert_eq!(m["profile"]["dev"]["package"]["helpers"]["opt-level"].as_integer(), Some(3));
    assert_eq!(m["profile"]["dev"]["package"]["program-base-olmoe"]["opt-level"].as_integer(), Some(3));

    let nb = root.join("experiments/base-olmoe/experiment.ipynb");
    assert_eq!(program_name(&nb).unwrap(), "base-olmoe");
    assert_eq!(program_name(&root.join("experiments/base-olmoe/interp-baselines.ipynb")).unwrap(), "base-olmoe-interp-baselines");
}

/// Every committed notebook that the kernel runs translates (its cells parse, no redefinitions).
#[test]
fn the_projects_notebooks_translate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().parent().unwrap();
    for dir in std::fs::read_dir(root.join("experiments")).unwrap() {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "ipynb") {
                let prog = generate(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                assert!(prog.deps.iter().any(|(n, _)| n == "tch"), "{}", p.display());
                assert!(prog.main_rs.contains("helpers::runtime::init()"), "{}", p.display());
            }
        }
    }
}
