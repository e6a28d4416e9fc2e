//! Overrides for headless runs, read from environment variables in a notebook's config cell
//! (Jupyter cannot inject parameters into a Rust kernel).
//!
//! - [`env_parse`]: one typed variable such as `MOE_STEPS=200`.
//! - [`Overrides`]: any config field, from a TOML file (`MOE_CONFIG=my-run.toml`, one table per
//!   section: `[train]` then `lr = 3e-4`) and then `MOE_SET="model.n_layers=4 train.lr=1e-3"`,
//!   which wins. `MOE_SET` values are JSON (`4`, `1e-3`, `true`, `"text"`), or a bare word taken as
//!   a string. An unknown section or field or a value of the wrong type is an error naming it (and
//!   the file), raised before anything is allocated.
use crate::WithCause;
use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;
use std::str::FromStr;

/// `Ok(None)` when `name` is unset or empty; the parsed value; or an error naming the variable.
pub fn env_parse<T: FromStr>(name: &str) -> Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(s) if s.trim().is_empty() => Ok(None),
        Ok(s) => match s.trim().parse::<T>() {
            Ok(v) => Ok(Some(v)),
            Err(e) => bail!("{name}={s:?} is not a valid {}: {e}", std::any::type_name::<T>()),
        },
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => bail!("{name}: {e}"),
    }
}

/// Field assignments `section.field=value`, separated by spaces, newlines, or commas followed by the
/// next `section.field=`. A value may itself hold commas and colons
/// (`train.expert_placement=contiguous:cuda:0,cuda:1`), and JSON values may hold spaces inside
/// quotes or brackets (`train.interp_tokens=[" the", " and"]`, `train.sample_prompt="ROMEO. "`).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub entries: Vec<(String, String, serde_json::Value)>,
    /// Where each entry came from (`MOE_SET`, `MOE_CONFIG=runs.toml`), for error messages.
    pub origins: Vec<String>,
}

impl Overrides {
    /// The environment's overrides: the TOML file `MOE_CONFIG` names (if set), then the assignments
    /// in the variable `var` (missing = none), applied in that order so `var` wins; `sections` are
    /// the valid section names.
    pub fn from_env(var: &str, sections: &[&str]) -> Result<Self> {
        let file = std::env::var("MOE_CONFIG").ok().filter(|p| !p.trim().is_empty());
        Self::from_sources(file.as_deref().map(|p| Path::new(p.trim())), var, &std::env::var(var).unwrap_or_default(), sections)
    }

    /// [`Overrides::from_env`] with its inputs given: the config file, then `set` (read from `var`).
    pub fn from_sources(file: Option<&Path>, var: &str, set: &str, sections: &[&str]) -> Result<Self> {
        let mut o = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_cause(|| format!("MOE_CONFIG={}: cannot read it", path.display()))?;
                let origin = format!("MOE_CONFIG={}", path.display());
                if path.extension().is_some_and(|e| e == "json") {
                    // A run's config.json: run again with exactly its settings.
                    let v: serde_json::Value = serde_json::from_str(&text).with_cause(|| format!("in {origin}: not valid JSON"))?;
                    Self::from_tables(v.as_object().cloned().unwrap_or_default(), sections, &origin)?
                } else {
                    Self::from_toml(&text, sections, &origin)?
                }
            }
            None => Self::default(),
        };
        // The cause in the one message: a notebook prints an error with `{}`, which drops context.
        let set = Self::parse(set, sections).with_cause(|| format!("in {var}={set:?}"))?;
        o.origins.extend(set.entries.iter().map(|_| var.to_string()));
        o.entries.extend(set.entries);
        Ok(o)
    }

    /// A config file: one TOML table per section, any of its fields (`[train]` then `lr = 3e-4`).
    /// Fields are checked when applied, like `MOE_SET`'s; errors name `origin`.
    pub fn from_toml(text: &str, sections: &[&str], origin: &str) -> Result<Self> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            let at = line.map(|l| format!(" at line {l}")).unwrap_or_default();
            anyhow::anyhow!("in {origin}: not valid TOML{at}: {}", e.message().trim())
        })?;
        let tables = serde_json::to_value(table).with_cause(|| format!("in {origin}"))?;
        Self::from_tables(tables.as_object().cloned().unwrap_or_default(), sections, origin)
    }

    /// `{section: {field: value}}` (a config file as JSON), in the file's order.
    fn from_tables(tables: serde_json::Map<String, serde_json::Value>, sections: &[&str], origin: &str) -> Result<Self> {
        let mut o = Self::default();
        for (section, fields) in tables {
            let Some(fields) = fields.as_object().filter(|_| sections.contains(&section.as_str())) else {
                bail!("in {origin}: {section:?} is not a config section; put fields under one of the tables {}",
                      sections.iter().map(|s| format!("[{s}]")).collect::<Vec<_>>().join(", "))
            };
            for (field, value) in fields {
                o.entries.push((section.clone(), field.clone(), value.clone()));
                o.origins.push(origin.to_string());
            }
        }
        Ok(o)
    }

    pub fn parse(s: &str, sections: &[&str]) -> Result<Self> {
        let mut entries = Vec::new();
        for item in split_items(s) {
            let item = item.as_str();
            let Some((key, raw)) = item.split_once('=') else { bail!("{item:?} is not of the form section.field=value") };
            let Some((section, field)) = key.split_once('.') else {
                bail!("{key:?} needs a section prefix, one of {sections:?} (e.g. model.n_layers=4)")
            };
            if !sections.contains(&section) {
                bail!("unknown config section {section:?} in {item:?}; expected one of {sections:?}");
            }
            let value = serde_json::from_str(raw).unwrap_or_else(|_| serde_json::Value::String(raw.to_string()));
            entries.push((section.to_string(), field.to_string(), value));
        }
        let origins = vec![String::new(); entries.len()];
        Ok(Self { entries, origins })
    }

    /// Returns `cfg` with this section's assignments applied.
    pub fn apply<T: Serialize + DeserializeOwned>(&self, section: &str, cfg: T) -> Result<T> {
        let mut v = serde_json::to_value(&cfg)?;
        for (i, (s, field, value)) in self.entries.iter().enumerate().filter(|(_, e)| e.0 == section) {
            let from = match self.origins.get(i).map(String::as_str) {
                Some(o) if !o.is_empty() => format!(" (in {o})"),
                _ => String::new(),
            };
            let obj = v.as_object_mut().context("config must serialise to a JSON object")?;
            if !obj.contains_key(field) {
                let mut known: Vec<&String> = obj.keys().collect();
                known.sort();
                bail!("unknown field {s}.{field}{from}; {s} has {known:?}");
            }
            obj.insert(field.clone(), value.clone());
            // Deserialise after each assignment so a type error names the field that caused it. The
            // cause goes into the one message: notebooks print errors with `{}`, which drops context.
            if let Err(e) = serde_json::from_value::<T>(v.clone()) {
                bail!("bad value for {s}.{field}{from}: {value} ({e})");
            }
        }
        Ok(serde_json::from_value(v)?)
    }
}

/// The assignments of an override string (see [`Overrides`]): split at whitespace, and at a comma
/// when the next assignment follows it, never inside a quoted string or brackets.
fn split_items(s: &str) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    // Does an assignment `section.field=` start here (after optional whitespace)?
    let starts_item = |rest: &[char]| -> bool {
        let rest: String = rest.iter().collect();
        let Some((key, _)) = rest.trim_start().split_once('=') else { return false };
        let Some((section, field)) = key.split_once('.') else { return false };
        let word = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        word(section) && word(field)
    };
    let (mut items, mut cur) = (Vec::new(), String::new());
    let (mut depth, mut in_str, mut escaped) = (0i32, false, false);
    for (i, &c) in chars.iter().enumerate() {
        if in_str {
            cur.push(c);
            if escaped {
                escaped = false
            } else if c == '\\' {
                escaped = true
            } else if c == '"' {
                in_str = false
            }
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                cur.push(c)
            }
            '[' | '{' => {
                depth += 1;
                cur.push(c)
            }
            ']' | '}' => {
                depth -= 1;
                cur.push(c)
            }
            c if depth <= 0 && (c.is_whitespace() || (c == ',' && starts_item(&chars[i + 1..]))) => {
                if !cur.is_empty() {
                    items.push(std::mem::take(&mut cur))
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        items.push(cur)
    }
    // A trailing comma ("model.n_layers=4, ") separates nothing.
    items.into_iter().map(|i| i.trim_end_matches(',').to_string()).filter(|i| !i.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        n_layers: usize,
        lr: f64,
        name: String,
    }

    fn cfg() -> Cfg {
        Cfg { n_layers: 2, lr: 1e-3, name: "a".into() }
    }

    #[test]
    fn applies_typed_values_per_section() {
        let o = Overrides::parse("model.n_layers=4, train.lr=3e-4 model.name=tiny", &["model", "train"]).unwrap();
        let m = o.apply("model", cfg()).unwrap();
        assert_eq!(m, Cfg { n_layers: 4, lr: 1e-3, name: "tiny".into() });
        assert_eq!(o.apply("train", cfg()).unwrap().lr, 3e-4);
    }

    #[test]
    fn values_may_hold_commas_colons_spaces_and_json() {
        let o = Overrides::parse("model.name=contiguous:cuda:0,cuda:1, train.lr=3e-4,model.n_layers=4", &["model", "train"]).unwrap();
        let got: Vec<String> = o.entries.iter().map(|(s, f, v)| format!("{s}.{f}={v}")).collect();
        assert_eq!(got, ["model.name=\"contiguous:cuda:0,cuda:1\"", "train.lr=0.0003", "model.n_layers=4"]);
        let o = Overrides::parse("train.tokens=[\" the\", \" and\"] model.name=\"ROMEO. \\\"x\\\"\" train.lr=1,", &["model", "train"]).unwrap();
        assert_eq!(o.entries[0].2, serde_json::json!([" the", " and"]));
        assert_eq!(o.entries[1].2, serde_json::json!("ROMEO. \"x\""));
        assert_eq!(o.entries[2].2, serde_json::json!(1));
        assert_eq!(o.entries.len(), 3);
    }

    #[test]
    fn bad_input_names_the_problem() {
        let e = Overrides::parse("model.n_layers=x", &["model"]).unwrap().apply("model", cfg()).unwrap_err();
        assert!(format!("{e:#}").contains("bad value for model.n_layers"), "{e:#}");
        let e = Overrides::parse("model.n_layer=4", &["model"]).unwrap().apply("model", cfg()).unwrap_err();
        assert!(e.to_string().contains("unknown field model.n_layer"), "{e}");
        let e = Overrides::parse("optim.lr=1", &["model", "train"]).unwrap_err();
        assert!(e.to_string().contains("unknown config section \"optim\""), "{e}");
        assert!(Overrides::parse("lr=1", &["train"]).unwrap_err().to_string().contains("section prefix"));
        assert!(Overrides::parse("train.lr", &["train"]).unwrap_err().to_string().contains("section.field=value"));
    }

    #[test]
    fn an_error_from_the_variable_keeps_its_cause_on_one_line() {
        std::env::set_var("HELPERS_TEST_SET", "optim.lr=1");
        let e = Overrides::from_env("HELPERS_TEST_SET", &["model", "train"]).unwrap_err().to_string(); // `{}`, as a notebook prints
        assert!(e.starts_with("in HELPERS_TEST_SET=\"optim.lr=1\": unknown config section \"optim\""), "{e}");
    }

    #[test]
    fn a_config_file_sets_any_field_and_moe_set_wins() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("run.toml");
        std::fs::write(&path, "# my run\n[model]\nn_layers = 6\nname = \"from-file\"\n\n[train]\nlr = 3e-4\n").unwrap();
        let o = Overrides::from_sources(Some(&path), "MOE_SET", "model.n_layers=8", &["model", "train"]).unwrap();
        assert_eq!(o.apply("model", cfg()).unwrap(), Cfg { n_layers: 8, lr: 1e-3, name: "from-file".into() });
        assert_eq!(o.apply("train", cfg()).unwrap().lr, 3e-4);
        // Without MOE_SET the file's values stand.
        let o = Overrides::from_sources(Some(&path), "MOE_SET", "", &["model", "train"]).unwrap();
        assert_eq!(o.apply("model", cfg()).unwrap().n_layers, 6);
        // A run's config.json (both sections, every field) sets everything.
        let json = d.path().join("config.json");
        std::fs::write(&json, r#"{"model": {"n_layers": 3, "lr": 0.5, "name": "run"}, "train": {"lr": 0.25}}"#).unwrap();
        let o = Overrides::from_sources(Some(&json), "MOE_SET", "", &["model", "train"]).unwrap();
        assert_eq!(o.apply("model", cfg()).unwrap(), Cfg { n_layers: 3, lr: 0.5, name: "run".into() });
    }

    #[test]
    fn a_bad_config_file_names_itself_and_the_problem_on_one_line() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("bad.toml");
        let err = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let e = Overrides::from_sources(Some(&path), "MOE_SET", "", &["model", "train"]).and_then(|o| o.apply("model", cfg()).map(|_| ()));
            let msg = e.unwrap_err().to_string(); // `{}`, as a notebook prints
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.contains("bad.toml"), "{msg}");
            msg
        };
        assert!(err("[model]\nn_layer = 4\n").contains("unknown field model.n_layer (in MOE_CONFIG="), "unknown field");
        assert!(err("[model]\nn_layers = \"four\"\n").contains("bad value for model.n_layers (in MOE_CONFIG="));
        assert!(err("[optim]\nlr = 1\n").contains("\"optim\" is not a config section; put fields under one of the tables [model], [train]"));
        assert!(err("lr = 1\n").contains("\"lr\" is not a config section"));
        assert!(err("[model]\nn_layers = \n").contains("not valid TOML at line 2"));
        let missing = d.path().join("absent.toml");
        let e = Overrides::from_sources(Some(&missing), "MOE_SET", "", &["model"]).unwrap_err().to_string();
        assert!(e.starts_with(&format!("MOE_CONFIG={}: cannot read it", missing.display())), "{e}");
    }

    #[test]
    fn env_parse_reports_the_variable() {
        std::env::set_var("HELPERS_TEST_STEPS", "12x");
        let e = env_parse::<u64>("HELPERS_TEST_STEPS").unwrap_err().to_string();
        assert!(e.contains("HELPERS_TEST_STEPS=\"12x\""), "{e}");
        std::env::set_var("HELPERS_TEST_STEPS", " 12 ");
        assert_eq!(env_parse::<u64>("HELPERS_TEST_STEPS").unwrap(), Some(12));
        assert_eq!(env_parse::<u64>("HELPERS_TEST_UNSET_VAR").unwrap(), None);
    }
}
