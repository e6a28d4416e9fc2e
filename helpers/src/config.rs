//! Overrides for headless runs, read from environment variables in a notebook's config cell
//! (Jupyter cannot inject parameters into a Rust kernel).
//!
//! - [`env_parse`]: one typed variable such as `MOE_STEPS=200`.
//! - [`Overrides`]: any config field, `MOE_SET="model.n_layers=4 train.lr=1e-3"`. Values are JSON
//!   (`4`, `1e-3`, `true`, `"text"`), or a bare word taken as a string. An unknown section or field
//!   or a value of the wrong type is an error naming it, raised before anything is allocated.
use crate::WithCause;
use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};
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
}

impl Overrides {
    /// Reads the variable `var` (missing = no overrides); `sections` are the valid prefixes.
    pub fn from_env(var: &str, sections: &[&str]) -> Result<Self> {
        let s = std::env::var(var).unwrap_or_default();
        // The cause in the one message: a notebook prints an error with `{}`, which drops context.
        Self::parse(&s, sections).with_cause(|| format!("in {var}={s:?}"))
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
        Ok(Self { entries })
    }

    /// Returns `cfg` with this section's assignments applied.
    pub fn apply<T: Serialize + DeserializeOwned>(&self, section: &str, cfg: T) -> Result<T> {
        let mut v = serde_json::to_value(&cfg)?;
        for (s, field, value) in self.entries.iter().filter(|e| e.0 == section) {
            let obj = v.as_object_mut().context("config must serialise to a JSON object")?;
            if !obj.contains_key(field) {
                let mut known: Vec<&String> = obj.keys().collect();
                known.sort();
                bail!("unknown field {s}.{field}; {s} has {known:?}");
            }
            obj.insert(field.clone(), value.clone());
            // Deserialise after each assignment so a type error names the field that caused it. The
            // cause goes into the one message: notebooks print errors with `{}`, which drops context.
            if let Err(e) = serde_json::from_value::<T>(v.clone()) {
                bail!("bad value for {s}.{field}: {value} ({e})");
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
    fn env_parse_reports_the_variable() {
        std::env::set_var("HELPERS_TEST_STEPS", "12x");
        let e = env_parse::<u64>("HELPERS_TEST_STEPS").unwrap_err().to_string();
        assert!(e.contains("HELPERS_TEST_STEPS=\"12x\""), "{e}");
        std::env::set_var("HELPERS_TEST_STEPS", " 12 ");
        assert_eq!(env_parse::<u64>("HELPERS_TEST_STEPS").unwrap(), Some(12));
        assert_eq!(env_parse::<u64>("HELPERS_TEST_UNSET_VAR").unwrap(), None);
    }
}
