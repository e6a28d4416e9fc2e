//! An experiment notebook as a Rust program: the same code cells, compiled once, run anywhere.
//!
//! `bash setup.sh build <notebook>` calls this crate's command (`moe-program build`). It reads the
//! notebook's code cells in order and writes a cargo package whose `main` is those cells, one after
//! another, so a program run takes the same `MOE_*` overrides and writes the same run directory as
//! the notebook. Nothing is copied by hand: the program is regenerated from the notebook every build.
//!
//! How evcxr's cell semantics map onto one `fn main`:
//! - `:dep name = ...` lines become the package's `[dependencies]` (path dependencies made absolute;
//!   `tch` pinned to the release that binds the chosen libtorch, see [`tch_for_torch`]); other `:`
//!   commands (`:opt`, `:preserve_vars_on_panic`) have no meaning in a program and are dropped.
//! - Everything else goes into `main`'s body in cell order. Rust allows items (`fn`, `struct`,
//!   `impl`, `use`, `const`) inside a function body and makes them visible in the whole body, as
//!   evcxr makes them visible to later cells; `let` bindings carry from cell to cell as in the
//!   kernel. A `use` repeated in a later cell (harmless in evcxr, an error in one body) is kept once.
//! - A cell's trailing expression, which the kernel would display, is printed with `{:?}` (nothing
//!   for `()`, as in the kernel).
//! - `?` in a cell ends the program with the error (exit code 1), where the kernel would end the cell.
//! - Cells tagged `no-program` (or any tag passed with `--skip-tag`) are left out.
//!
//! Where it is built: cargo's dev profile in the project's own `target/`, with the project's
//! profile settings, so a program reuses every dependency `bash setup.sh` already compiled (the
//! ~300 crates, tch and helpers included): a first build compiles only the notebook's code (at
//! opt-level 3). For the torch setup installed (tch as the project pins it) the program depends on
//! `helpers/` itself; for another torch (the GPU check's 2.11.0) it links `helpers` through a
//! generated manifest that points at `helpers/src` and pins that torch's tch, so one build holds
//! exactly one tch (and one libtorch), and only tch, torch-sys and helpers are built again.
use anyhow::{bail, Context, Result};
use quote::ToTokens;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// libtorch versions whose tch release (torch-sys's `TORCH_VERSION`) this project has built its
/// programs against and trained with. setup.sh's `tch_for_torch` holds the same table.
pub const TORCH_TCH: &[(&str, &str)] = &[("2.13.0", "0.26.0"), ("2.11.0", "0.24.0"), ("2.10.0", "0.23.0")];

/// The tch release for a torch version (`2.11.0`, `2.11.0+cu130`: the local part is ignored).
pub fn tch_for_torch(torch: &str) -> Result<&'static str> {
    let public = torch.split('+').next().unwrap_or(torch).trim();
    TORCH_TCH.iter().find(|(t, _)| *t == public).map(|(_, tch)| *tch).with_context(|| {
        let known: Vec<String> = TORCH_TCH.iter().map(|(t, c)| format!("torch {t} = tch {c}")).collect();
        format!(
            "torch {torch} has no matching tch release this project knows ({}); install one of those torch versions, \
                 or unset MOE_TORCH_PYTHON to let setup.sh download torch 2.13.0",
            known.join(", ")
        )
    })
}

/// One cell of a notebook (nbformat 4).
#[derive(Debug, Clone)]
pub struct Cell {
    pub code: bool,
    pub source: String,
    pub tags: Vec<String>,
}

/// Reads the cells of an `.ipynb` file.
pub fn read_cells(path: &Path) -> Result<Vec<Cell>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read notebook {}", path.display()))?;
    let nb: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not a notebook (invalid JSON)", path.display()))?;
    let cells = nb.get("cells").and_then(|c| c.as_array()).with_context(|| format!("{} has no cells", path.display()))?;
    Ok(cells
        .iter()
        .map(|c| {
            let source = match c.get("source") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Array(parts)) => parts.iter().filter_map(|p| p.as_str()).collect(),
                _ => String::new(),
            };
            let tags =
                c.pointer("/metadata/tags").and_then(|t| t.as_array()).map(|t| t.iter().filter_map(|s| s.as_str().map(String::from)).collect());
            Cell { code: c.get("cell_type").and_then(|t| t.as_str()) == Some("code"), source, tags: tags.unwrap_or_default() }
        })
        .collect())
}

/// The generated program: `main.rs` and the dependencies its cells declared.
#[derive(Debug)]
pub struct Program {
    pub main_rs: String,
    /// `:dep` lines, in order: name -> TOML value (path dependencies already absolute).
    pub deps: Vec<(String, toml::Value)>,
    /// Indices (in the notebook) of the code cells that made it into `main`.
    pub cells: Vec<usize>,
}

/// Tags whose cells never go into a program.
pub const NO_PROGRAM_TAG: &str = "no-program";

/// Turns the notebook at `nb_path` into a program, leaving out cells tagged `no-program` or any of
/// `skip_tags`.
pub fn generate(nb_path: &Path, skip_tags: &[String]) -> Result<Program> {
    let cells = read_cells(nb_path)?;
    let nb_dir = nb_path.parent().unwrap_or(Path::new(".")).canonicalize()?;
    let shown = nb_path.display().to_string();
    let mut deps: Vec<(String, toml::Value)> = Vec::new();
    let mut body = String::new();
    let mut seen_uses: Vec<String> = Vec::new();
    let mut items: HashMap<String, usize> = HashMap::new();
    let mut used_cells = Vec::new();
    let mut heading = String::new();
    let mut n_code = 0;
    for (ix, cell) in cells.iter().enumerate() {
        if !cell.code {
            if let Some(h) = cell.source.lines().find(|l| l.starts_with('#')) {
                heading = h.trim_start_matches('#').trim().to_string();
            }
            continue;
        }
        n_code += 1;
        if cell.tags.iter().any(|t| t == NO_PROGRAM_TAG || skip_tags.contains(t)) {
            continue;
        }
        // evcxr commands: lines that start with ':' (before any code line of the cell).
        let mut code_lines = Vec::new();
        for line in cell.source.lines() {
            match line.trim_start().strip_prefix(':') {
                Some(cmd) if !line.trim_start().starts_with("::") => {
                    if let Some(spec) = cmd.strip_prefix("dep ") {
                        let (name, value) =
                            parse_dep(spec, &nb_dir).with_context(|| format!("{shown}, code cell {n_code}: bad `:dep {}`", spec.trim()))?;
                        match deps.iter().find(|(n, _)| *n == name) {
                            Some((_, v)) if *v != value => bail!("{shown}: `:dep {name}` is given twice with different values"),
                            Some(_) => {}
                            None => deps.push((name, value)),
                        }
                    }
                    code_lines.push(format!("// {}  (evcxr command; a program's dependencies are in its Cargo.toml)", line.trim()));
                }
                _ => code_lines.push(line.to_string()),
            }
        }
        let code = code_lines.join("\n");
        if code.trim().is_empty() {
            continue;
        }
        let code = rewrite_cell(&code, ix, &mut seen_uses, &mut items)
            .with_context(|| format!("{shown}, code cell {n_code} (\"{}\")", first_code_line(&code)))?;
        used_cells.push(ix);
        body.push_str(&format!(
            "\n    // ---- code cell {n_code}{} ----\n",
            if heading.is_empty() { String::new() } else { format!(", section \"{heading}\"") }
        ));
        for line in code.lines() {
            if line.trim().is_empty() {
                body.push('\n');
            } else {
                body.push_str("    ");
                body.push_str(line);
                body.push('\n');
            }
        }
    }
    if !deps.iter().any(|(n, _)| n == "anyhow") {
        deps.push(("anyhow".into(), toml::Value::String("1".into())));
    }
    let experiment = nb_dir.file_name().and_then(|n| n.to_str()).unwrap_or("program").to_string();
    let main_rs = format!(
        "//! Generated from {shown} by `bash setup.sh build` (helpers/program); do not edit: edit the\n\
         //! notebook and build again. Each block below is one code cell of the notebook, in order.\n\
         #![allow(unused, dead_code, non_snake_case, non_camel_case_types, unreachable_code, clippy::all)]\n\n\
         /// What the notebook would display for a cell's trailing expression (nothing for `()`).\n\
         fn __show_cell_value<T: std::fmt::Debug>(v: &T) {{\n    if std::any::type_name::<T>() != \"()\" {{\n        println!(\"{{v:?}}\");\n    }}\n}}\n\n\
         fn main() -> anyhow::Result<()> {{\n    \
         // The notebook's folder names the run's folder under runs/ (helpers::run::experiment_name).\n    \
         if std::env::var_os(\"MOE_EXPERIMENT\").is_none() {{ std::env::set_var(\"MOE_EXPERIMENT\", {experiment:?}); }}\n{body}\n    Ok(())\n}}\n"
    );
    Ok(Program { main_rs, deps, cells: used_cells })
}

fn first_code_line(code: &str) -> String {
    code.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with("//")).unwrap_or("").chars().take(60).collect()
}

/// `name = <TOML value>` of a `:dep` line; a relative `path` is resolved against the notebook's folder.
fn parse_dep(spec: &str, nb_dir: &Path) -> Result<(String, toml::Value)> {
    let table: toml::Table = spec.parse().context("expected `name = \"version\"` or `name = { ... }` in TOML")?;
    let (name, mut value) = table.into_iter().next().context("empty :dep")?;
    if let Some(t) = value.as_table_mut() {
        if let Some(p) = t.get("path").and_then(|p| p.as_str()) {
            let abs = nb_dir.join(p);
            let abs = abs.canonicalize().with_context(|| format!("path {} does not exist", abs.display()))?;
            t.insert("path".into(), toml::Value::String(abs.display().to_string()));
        }
    }
    Ok((name, value))
}

/// Line/column range of a syntax node (1-based lines, 0-based columns, end exclusive).
fn range(node: &impl ToTokens) -> Option<(proc_macro2::LineColumn, proc_macro2::LineColumn)> {
    let tokens: Vec<proc_macro2::TokenTree> = node.to_token_stream().into_iter().collect();
    Some((tokens.first()?.span().start(), tokens.last()?.span().end()))
}

/// Offset into `text` of a (line, column) position of [`range`], with lines counted in `text`.
fn offset(text: &str, at: proc_macro2::LineColumn) -> usize {
    let mut off = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if i + 1 == at.line {
            return off + line.char_indices().nth(at.column).map(|(b, _)| b).unwrap_or(line.len());
        }
        off += line.len();
    }
    text.len()
}

/// Parses one cell as the body of a block, drops `use` items already seen in earlier cells, checks
/// that no item is defined twice, and prints a trailing expression.
fn rewrite_cell(code: &str, cell_ix: usize, seen_uses: &mut Vec<String>, items: &mut HashMap<String, usize>) -> Result<String> {
    // Parse `{` + code + `}` with the code starting on line 1 of its own (the brace line is line 1).
    let wrapped = format!("{{\n{code}\n}}");
    let block: syn::Block = syn::parse_str(&wrapped).map_err(|e| {
        let at = e.span().start();
        anyhow::anyhow!("does not parse as Rust at its line {}: {e}", at.line.saturating_sub(1))
    })?;
    // Edits as (start, end, replacement) on `wrapped`, applied back to front.
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    let n = block.stmts.len();
    for (i, stmt) in block.stmts.iter().enumerate() {
        match stmt {
            syn::Stmt::Item(syn::Item::Use(u)) => {
                let key = u.tree.to_token_stream().to_string();
                if seen_uses.contains(&key) {
                    if let Some((s, e)) = range(u) {
                        edits.push((
                            offset(&wrapped, s),
                            offset(&wrapped, e),
                            format!("/* already imported by an earlier cell: {} */", key.replace(' ', "")),
                        ));
                    }
                } else {
                    seen_uses.push(key);
                }
            }
            syn::Stmt::Item(item) => {
                if let Some(key) = item_name(item) {
                    if let Some(prev) = items.insert(key.clone(), cell_ix) {
                        if prev != cell_ix {
                            let name = key.split_once(':').map(|(_, n)| n).unwrap_or(&key);
                            bail!(
                                "redefines `{name}`, already defined in an earlier cell: the kernel replaces it, a program \
                                   cannot; give one of them another name"
                            );
                        }
                    }
                }
            }
            syn::Stmt::Expr(e, None) if i + 1 == n => {
                if let Some((s, end)) = range(e) {
                    edits.push((offset(&wrapped, end), offset(&wrapped, end), ");".into()));
                    edits.push((offset(&wrapped, s), offset(&wrapped, s), "__show_cell_value(&".into()));
                }
            }
            _ => {}
        }
    }
    edits.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut out = wrapped.clone();
    for (s, e, text) in edits {
        out.replace_range(s..e, &text);
    }
    // Strip the braces added above.
    let inner = out.strip_prefix("{\n").and_then(|s| s.strip_suffix("\n}")).context("internal: lost the cell's braces")?;
    Ok(inner.to_string())
}

fn item_name(item: &syn::Item) -> Option<String> {
    // Keyed by namespace: a `fn f` and a `struct F` never clash, two `fn f` do.
    let (ns, ident) = match item {
        syn::Item::Fn(f) => ("value", &f.sig.ident),
        syn::Item::Const(c) => ("value", &c.ident),
        syn::Item::Static(s) => ("value", &s.ident),
        syn::Item::Struct(s) => ("type", &s.ident),
        syn::Item::Enum(e) => ("type", &e.ident),
        syn::Item::Union(u) => ("type", &u.ident),
        syn::Item::Trait(t) => ("type", &t.ident),
        syn::Item::Type(t) => ("type", &t.ident),
        syn::Item::Mod(m) => ("type", &m.ident),
        _ => return None,
    };
    Some(format!("{ns}:{ident}"))
}

/// Where a program of `name` for `torch` lives: `<root>/target/programs/torch-<version>/`.
pub fn torch_dir(root: &Path, torch: &str) -> PathBuf {
    root.join("target").join("programs").join(format!("torch-{}", torch.split('+').next().unwrap_or(torch)))
}

/// The program's name: the experiment's folder, plus the notebook's stem unless it is `experiment`.
pub fn program_name(nb_path: &Path) -> Result<String> {
    let stem = nb_path.file_stem().and_then(|s| s.to_str()).context("notebook path has no file name")?;
    let dir = nb_path.canonicalize()?.parent().and_then(|d| d.file_name()).and_then(|s| s.to_str()).unwrap_or("program").to_string();
    let raw = if stem == "experiment" { dir } else { format!("{dir}-{stem}") };
    let name: String = raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        Ok(format!("nb-{name}"))
    } else {
        Ok(name)
    }
}

/// A `Cargo.toml` for `helpers` built against `tch`: helpers' own manifest with tch and torch-sys
/// pinned to `tch`, its sources used in place (absolute `lib` and `build` paths), no tests or bins.
pub fn helpers_manifest(root: &Path, tch: &str) -> Result<String> {
    let read = |p: PathBuf| -> Result<toml::Table> {
        std::fs::read_to_string(&p)?.parse::<toml::Table>().with_context(|| format!("cannot parse {}", p.display()))
    };
    let ws = read(root.join("Cargo.toml"))?;
    let mut m = read(root.join("helpers").join("Cargo.toml"))?;
    let ws_pkg = ws.get("workspace").and_then(|w| w.get("package")).and_then(|p| p.as_table()).cloned().unwrap_or_default();
    let pkg = m.get_mut("package").and_then(|p| p.as_table_mut()).context("helpers/Cargo.toml has no [package]")?;
    for (k, v) in pkg.iter_mut() {
        if v.get("workspace").and_then(|w| w.as_bool()) == Some(true) {
            *v = ws_pkg.get(k).cloned().with_context(|| format!("workspace.package.{k} is missing"))?;
        }
    }
    let src = root.join("helpers");
    pkg.insert("build".into(), src.join("build.rs").display().to_string().into());
    for auto in ["autobins", "autotests", "autoexamples", "autobenches"] {
        pkg.insert(auto.into(), false.into());
    }
    let mut lib = toml::Table::new();
    lib.insert("path".into(), src.join("src").join("lib.rs").display().to_string().into());
    m.insert("lib".into(), lib.into());
    m.remove("dev-dependencies");
    let deps = m.get_mut("dependencies").and_then(|d| d.as_table_mut()).context("helpers/Cargo.toml has no [dependencies]")?;
    for name in ["tch", "torch-sys"] {
        if let Some(v) = deps.get_mut(name) {
            pin(v, tch);
        }
    }
    Ok(format!("# Generated by helpers/program from helpers/Cargo.toml, pinned to tch {tch}; do not edit.\n{}", toml::to_string(&m)?))
}

fn pin(v: &mut toml::Value, version: &str) {
    let want = toml::Value::String(format!("={version}"));
    match v {
        toml::Value::Table(t) => {
            t.insert("version".into(), want);
        }
        other => *other = want,
    }
}

/// The tch release the project itself pins (helpers/Cargo.toml), the one `bash setup.sh` builds.
pub fn project_tch(root: &Path) -> Result<String> {
    let path = root.join("helpers").join("Cargo.toml");
    let m: toml::Table = std::fs::read_to_string(&path)?.parse().with_context(|| format!("cannot parse {}", path.display()))?;
    let v = m.get("dependencies").and_then(|d| d.get("tch")).context("helpers/Cargo.toml has no tch dependency")?;
    let req = v.as_str().or_else(|| v.get("version").and_then(|x| x.as_str())).context("helpers' tch dependency has no version")?;
    Ok(req.trim_start_matches('=').to_string())
}

/// The program's `Cargo.toml`: its `:dep` lines with tch pinned to `tch` and `helpers` pointing at
/// `helpers_dir` (the project's helpers, or a generated manifest for another tch). Its profiles are
/// the project's (Cargo.toml's `[profile.*]`), so the dependencies are the very artifacts
/// `bash setup.sh` built; the program's own code is compiled at opt-level 3.
pub fn program_manifest(name: &str, deps: &[(String, toml::Value)], helpers_dir: &Path, tch: &str, root: &Path) -> Result<String> {
    let mut table = toml::Table::new();
    let helpers_src = root.join("helpers").canonicalize().unwrap_or_else(|_| root.join("helpers"));
    for (n, v) in deps {
        let mut v = v.clone();
        if n == "tch" || n == "torch-sys" {
            pin(&mut v, tch);
        }
        let is_helpers = v.get("path").and_then(|p| p.as_str()).map(|p| Path::new(p) == helpers_src).unwrap_or(false);
        if is_helpers {
            v.as_table_mut().unwrap().insert("path".into(), helpers_dir.display().to_string().into());
        }
        table.insert(n.clone(), v);
    }
    let package = package_name(name);
    let mut manifest: toml::Table = format!(
        "[package]\nname = \"{package}\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
         [[bin]]\nname = \"{package}\"\npath = \"main.rs\"\n\n\
         [workspace]\n"
    )
    .parse()?;
    manifest.insert("dependencies".into(), table.into());
    // Its own workspace (the project's excludes target/) with the project's profiles: cargo's
    // artifact hashes include the profile, so any difference would rebuild every dependency.
    let ws_path = root.join("Cargo.toml");
    let ws: toml::Table = std::fs::read_to_string(&ws_path)?.parse().with_context(|| format!("cannot parse {}", ws_path.display()))?;
    let mut profile = ws.get("profile").and_then(|p| p.as_table()).cloned().unwrap_or_default();
    let dev = profile.entry("dev").or_insert_with(|| toml::Table::new().into()).as_table_mut().context("[profile.dev] is not a table")?;
    let overrides = dev.entry("package").or_insert_with(|| toml::Table::new().into()).as_table_mut().context("[profile.dev.package] is not a table")?;
    let mut own = toml::Table::new();
    own.insert("opt-level".into(), 3.into());
    overrides.insert(package.clone(), own.into());
    manifest.insert("profile".into(), profile.into());
    Ok(format!("# Generated by helpers/program (bash setup.sh build); do not edit.\n{}", toml::to_string(&manifest)?))
}

/// Writes `text` to `path` unless it already holds exactly that (keeps cargo's rebuild checks quiet).
pub fn write_if_changed(path: &Path, text: &str) -> Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(true)
}

/// What [`prepare`] wrote: the package to build and where its binary will be.
#[derive(Debug)]
pub struct Prepared {
    pub name: String,
    pub package_dir: PathBuf,
    /// Cargo's target directory, shared by the programs of every torch (see [`prepare`]).
    pub target_dir: PathBuf,
    /// Where cargo leaves the binary (`<target_dir>/debug/program-<name>`); [`install`] copies it on.
    pub built: PathBuf,
    /// The program's own binary for this torch: `<torch_dir>/bin/<name>`.
    pub binary: PathBuf,
    pub program: Program,
}

/// Cargo's name for a program's package and binary: `program-<name>`, so that it never meets the
/// project's own binaries (`data`, `sweep`, ...) in the shared `target/debug/`.
pub fn package_name(name: &str) -> String {
    format!("program-{name}")
}

/// Copies the binary cargo built to [`Prepared::binary`] (through a rename, so a copy that is
/// running keeps running): the programs of two torch releases share cargo's target directory and
/// would otherwise replace each other's binary there.
pub fn install(p: &Prepared) -> Result<()> {
    let dir = p.binary.parent().context("binary path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.{}.tmp", p.name, std::process::id())); // two builds at once each copy their own
    std::fs::copy(&p.built, &tmp).with_context(|| format!("cannot copy {} to {}", p.built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &p.binary).with_context(|| format!("cannot move {} to {}", tmp.display(), p.binary.display()))?;
    Ok(())
}

/// Generates the program's package for `torch` under [`torch_dir`] (`src/<name>/`, and `helpers/`
/// for a tch other than the project's) and copies the project's `Cargo.lock` into it, so
/// dependencies keep the project's pinned versions. Cargo builds it in the project's `target/`
/// (dev profile, see the crate docs); [`install`] then puts the binary in `<torch_dir>/bin/`.
pub fn prepare(root: &Path, nb_path: &Path, torch: &str, skip_tags: &[String]) -> Result<Prepared> {
    let tch = tch_for_torch(torch)?;
    let program = generate(nb_path, skip_tags)?;
    let name = program_name(nb_path)?;
    let base = torch_dir(root, torch);
    let helpers_dir = if project_tch(root)? == tch {
        root.join("helpers").canonicalize().unwrap_or_else(|_| root.join("helpers"))
    } else {
        let dir = base.join("helpers");
        write_if_changed(&dir.join("Cargo.toml"), &helpers_manifest(root, tch)?)?;
        dir
    };
    let package_dir = base.join("src").join(&name);
    write_if_changed(&package_dir.join("Cargo.toml"), &program_manifest(&name, &program.deps, &helpers_dir, tch, root)?)?;
    write_if_changed(&package_dir.join("main.rs"), &program.main_rs)?;
    // The project's Cargo.lock every time: cargo then changes only what this build needs (tch and
    // torch-sys of another release), and every other crate keeps the version the project pins.
    let root_lock = std::fs::read_to_string(root.join("Cargo.lock")).context("cannot read the project's Cargo.lock")?;
    write_if_changed(&package_dir.join("Cargo.lock"), &root_lock)?;
    // The project's target directory: what setup built is reused as it is (tch, torch-sys and
    // helpers of another torch have other versions or paths, so cargo keeps them apart).
    let target_dir = root.join("target");
    let built = target_dir.join("debug").join(package_name(&name));
    let binary = base.join("bin").join(&name);
    Ok(Prepared { name, package_dir, target_dir, built, binary, program })
}

/// A summary of the dependencies for messages, tch as pinned: `tch =0.24.0, helpers path, ...`.
pub fn describe_deps(deps: &[(String, toml::Value)], tch: &str) -> String {
    let m: BTreeMap<&str, String> = deps
        .iter()
        .map(|(n, v)| match n.as_str() {
            "tch" | "torch-sys" => (n.as_str(), format!("={tch}")),
            _ => (
                n.as_str(),
                v.as_str().map(String::from).or_else(|| v.get("version").and_then(|x| x.as_str()).map(String::from)).unwrap_or_else(|| "path".into()),
            ),
        })
        .collect();
    m.iter().map(|(n, v)| format!("{n} {v}")).collect::<Vec<_>>().join(", ")
}
