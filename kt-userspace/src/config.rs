//! `~/.kt/config`, in kt-connect's layout: YAML mapping groups (`global`, `connect`,
//! `exchange`, ...) to items in dash-lowercase (`dns-mode`, `threshold-in-minus`) with string
//! values. A value is the default of the flag it names; a flag on the command line wins.
//! Profiles are copies of the file in `~/.kt/profile/<name>`.
//!
//! An item is a command-line argument: group `global` holds the global flags, any other group
//! is a subcommand, and the item is the argument's id with `_` as `-` (clap's ids are the
//! field names, so `dns_mode` is `connect.dns-mode`). The command line's own definition is
//! the list of items, so a new flag is configurable without anything added here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Arg, ArgAction, Command};

/// The file: group → item → value.
pub type Config = BTreeMap<String, BTreeMap<String, String>>;

/// `~/.kt` (`$KT_HOME` when set, as in the testbed's machines): `$HOME/.kt`, as kt-connect.
pub fn kt_home() -> PathBuf {
    if let Some(h) = std::env::var_os("KT_HOME") {
        return PathBuf::from(h);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".kt")
}

pub fn path() -> PathBuf {
    kt_home().join("config")
}

pub fn profile_dir() -> PathBuf {
    kt_home().join("profile")
}

/// Why the file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged ({why}): repair it, or empty it with `ktctl config unset --all`")]
    Damaged { path: String, why: String },
}

/// Reads the file; a missing file is an empty config.
pub fn load() -> Result<Config, ConfigError> {
    let p = path();
    match std::fs::read_to_string(&p) {
        Ok(text) => parse(&text).map_err(|why| ConfigError::Damaged {
            path: p.display().to_string(),
            why,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::new()),
        Err(source) => Err(ConfigError::Io {
            path: p.display().to_string(),
            source,
        }),
    }
}

/// Parses the YAML. Scalars of any kind (`true`, `5`) are taken as their text, as kt-connect's
/// Go YAML reads them into strings; an empty document or group is empty.
pub fn parse(text: &str) -> Result<Config, String> {
    if text.trim().is_empty() {
        return Ok(Config::new());
    }
    let raw: Option<BTreeMap<String, Option<BTreeMap<String, Scalar>>>> =
        serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(g, items)| {
            (
                g,
                items
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect(),
            )
        })
        .collect())
}

/// A YAML scalar as text.
struct Scalar(String);

impl<'de> serde::Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar(String::new()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Writes the file (creating `~/.kt`).
pub fn save(cfg: &Config) -> Result<(), ConfigError> {
    let p = path();
    let io = |source| ConfigError::Io {
        path: p.display().to_string(),
        source,
    };
    std::fs::create_dir_all(kt_home()).map_err(io)?;
    std::fs::write(&p, render(cfg)).map_err(io)
}

/// The YAML text of a config: groups and items sorted, values quoted.
pub fn render(cfg: &Config) -> String {
    if cfg.is_empty() {
        return "{}\n".into();
    }
    serde_saphyr::to_string(cfg).expect("a map of strings serialises")
}

/// Flags that are not settings: asking for the version or for more logs.
const NOT_ITEMS: [&str; 3] = ["help", "version", "verbose"];

/// The configurable arguments of a group: `global`'s are the root's global flags; a
/// subcommand's are its own options (not positionals, which name a target, not a default).
pub fn items<'a>(root: &'a Command, group: &str) -> Option<Vec<&'a Arg>> {
    let args: Box<dyn Iterator<Item = &Arg>> = if group == "global" {
        Box::new(root.get_arguments().filter(|a| a.is_global_set()))
    } else {
        Box::new(root.find_subcommand(group)?.get_arguments())
    };
    Some(
        args.filter(|a| !a.is_positional())
            .filter(|a| !NOT_ITEMS.contains(&a.get_id().as_str()))
            .filter(|a| !matches!(a.get_action(), ArgAction::Count | ArgAction::Help))
            .collect(),
    )
}

/// The groups, in the order `config show` lists them.
pub fn groups(root: &Command) -> Vec<String> {
    std::iter::once("global".to_string())
        .chain(
            root.get_subcommands()
                .filter(|s| items(root, s.get_name()).is_some_and(|i| !i.is_empty()))
                .map(|s| s.get_name().to_string()),
        )
        .collect()
}

/// A config item's name for an argument.
pub fn item_name(a: &Arg) -> String {
    a.get_id().as_str().replace('_', "-")
}

/// Finds `group.item`: the group and the argument. The error says what is wrong, as kt-connect
/// does.
pub fn resolve<'a>(root: &'a Command, key: &str) -> Result<(String, &'a Arg), String> {
    let hint = "; `ktctl config show --all` lists the items";
    let (group, item) = key
        .split_once('.')
        .filter(|(g, i)| !g.is_empty() && !i.is_empty() && !i.contains('.'))
        .ok_or_else(|| format!("config item '{key}' is invalid: give <group>.<item>{hint}"))?;
    let args =
        items(root, group).ok_or_else(|| format!("config group '{group}' does not exist{hint}"))?;
    let arg = args
        .into_iter()
        .find(|a| item_name(a) == item)
        .ok_or_else(|| format!("config item '{item}' does not exist in group '{group}'{hint}"))?;
    Ok((group.to_string(), arg))
}

/// Checks a value the way the flag's own parser takes it on the command line.
pub fn check(arg: &Arg, value: &str) -> Result<(), String> {
    let long = arg.get_long().unwrap_or_else(|| arg.get_id().as_str());
    let bad = |why: &str| format!("'{value}' is not a valid value for --{long}: {why}");
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return match value {
            "true" | "false" => Ok(()),
            _ => Err(bad("give true or false")),
        };
    }
    let one = Command::new("ktctl")
        .no_binary_name(true)
        .arg(arg.clone().required(false).global(false).env(None::<&str>));
    one.try_get_matches_from([format!("--{long}={value}")])
        .map(|_| ())
        .map_err(|e| {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default().to_string();
            bad(first.trim_start_matches("error: "))
        })
}

/// Makes the config's values the defaults of their flags. Items that do not exist or do not
/// parse are skipped with a warning each (the command still runs, as kt-connect's does).
pub fn apply(mut root: Command, cfg: &Config) -> (Command, Vec<String>) {
    let mut warnings = vec![];
    for (group, entries) in cfg {
        for (item, value) in entries {
            let key = format!("{group}.{item}");
            let id = match resolve(&root, &key).and_then(|(_, a)| {
                check(a, value)?;
                Ok(a.get_id().clone())
            }) {
                Ok(id) => id,
                Err(e) => {
                    warnings.push(format!("{} ignores {key}: {e}", path().display()));
                    continue;
                }
            };
            let set = |a: Arg| {
                let a = a.required(false);
                match a.get_value_delimiter() {
                    Some(d) => {
                        let parts: Vec<String> = value.split(d).map(str::to_string).collect();
                        a.default_values(parts)
                    }
                    None => a.default_value(value.clone()),
                }
            };
            root = if group == "global" {
                root.mut_arg(id, set)
            } else {
                root.mut_subcommand(group, |s| s.mut_arg(id, set))
            };
        }
    }
    (root, warnings)
}

#[cfg(test)]
mod tests;
