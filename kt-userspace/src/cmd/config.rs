//! `ktctl config`: show, get, set and unset the items of `~/.kt/config` (see
//! [`crate::config`]), and save, load, list and drop profiles of it. Nothing here needs a
//! cluster.

use std::io::{BufRead, IsTerminal, Write};

use clap::CommandFactory;

use super::status::table;
use crate::cli::{Cli, ConfigAction, ConfigArgs};
use crate::config::{self, Config, ConfigError, check, item_name, items, resolve};
use crate::error::{EnvError, Error, Result};

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Error {
        match e {
            ConfigError::Damaged { .. } => EnvError::new(e.to_string()).into(),
            ConfigError::Io { path, source } => Error::io(path, source),
        }
    }
}

pub fn run(args: &ConfigArgs) -> Result<u8> {
    let root = Cli::command();
    match &args.action {
        ConfigAction::Show { all } => {
            print!("{}", show(&root, &config::load()?, *all));
            Ok(0)
        }
        ConfigAction::Get { items } => {
            let cfg = config::load()?;
            for key in items {
                let (group, arg) = resolve(&root, key).map_err(EnvError::new)?;
                let item = item_name(arg);
                match cfg.get(&group).and_then(|g| g.get(&item)) {
                    Some(v) => println!("{key} = {v}"),
                    None => match default_of(arg) {
                        Some(d) => println!("{key} = {d}  (default)"),
                        None => println!("{key} = <empty>"),
                    },
                }
            }
            Ok(0)
        }
        ConfigAction::Set { words } => {
            let (key, value) = set_words(words)?;
            let (group, arg) = resolve(&root, &key).map_err(EnvError::new)?;
            check(arg, &value).map_err(EnvError::new)?;
            let mut cfg = config::load()?;
            cfg.entry(group).or_default().insert(item_name(arg), value);
            config::save(&cfg)?;
            Ok(0)
        }
        ConfigAction::Unset { items, all } => {
            if *all {
                config::save(&Config::new())?;
                return Ok(0);
            }
            if items.is_empty() {
                return Err(EnvError::new("give the items to unset, or --all").into());
            }
            let mut cfg = config::load()?;
            for key in items {
                // An item the file has is removed even if ktctl does not know it (a repair).
                let (group, item) = match resolve(&root, key) {
                    Ok((g, arg)) => (g, item_name(arg)),
                    Err(e) => match key.split_once('.') {
                        Some((g, i)) if cfg.get(g).is_some_and(|m| m.contains_key(i)) => {
                            (g.to_string(), i.to_string())
                        }
                        _ => return Err(EnvError::new(e).into()),
                    },
                };
                if let Some(g) = cfg.get_mut(&group) {
                    g.remove(&item);
                    if g.is_empty() {
                        cfg.remove(&group);
                    }
                }
            }
            config::save(&cfg)?;
            Ok(0)
        }
        ConfigAction::ListProfile => {
            let mut rows = vec![];
            match std::fs::read_dir(config::profile_dir()) {
                Ok(rd) => {
                    for e in rd.flatten() {
                        let meta = e
                            .metadata()
                            .map_err(|err| Error::io("reading profiles", err))?;
                        if !meta.is_file() {
                            continue;
                        }
                        let saved = meta
                            .modified()
                            .ok()
                            .and_then(|t| k8s_openapi::jiff::Timestamp::try_from(t).ok())
                            .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_default();
                        rows.push([saved, e.file_name().to_string_lossy().into_owned()]);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("reading profiles", e)),
            }
            rows.sort_by(|a, b| a[1].cmp(&b[1]));
            print!("{}", table(&["SAVED", "NAME"], &rows));
            Ok(0)
        }
        ConfigAction::SaveProfile { name } => {
            let path = profile(name)?;
            if path.exists()
                && !confirm(&format!(
                    "Profile '{name}' already exists, overwrite? (Y/N) "
                ))?
            {
                return Err(EnvError::new(format!(
                    "profile '{name}' exists; drop-profile it first, or answer Y on a terminal"
                ))
                .into());
            }
            let text = config::render(&config::load()?);
            std::fs::create_dir_all(config::profile_dir())
                .and_then(|()| std::fs::write(&path, text))
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            tracing::info!("Profile '{name}' saved");
            Ok(0)
        }
        ConfigAction::LoadProfile { name, dry_run } => {
            let path = profile(name)?;
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(EnvError::new(format!("profile '{name}' does not exist")).into());
                }
                Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
            };
            let cfg = config::parse(&text).map_err(|why| {
                EnvError::new(format!(
                    "profile '{name}' is damaged ({why}); nothing loaded"
                ))
            })?;
            if *dry_run {
                print!("{}", config::render(&cfg));
                return Ok(0);
            }
            config::save(&cfg)?;
            tracing::info!("Profile '{name}' loaded");
            Ok(0)
        }
        ConfigAction::DropProfile { name } => {
            let path = profile(name)?;
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!("Profile '{name}' removed");
                    Ok(0)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(EnvError::new(format!("profile '{name}' does not exist")).into())
                }
                Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
            }
        }
    }
}

/// `config show`: the items set, `group.item = value`; with `all`, every other item too, with
/// its built-in default when it has one. Items in the file that ktctl does not know come last,
/// marked, so that a typo is seen.
pub fn show(root: &clap::Command, cfg: &Config, all: bool) -> String {
    let mut out = String::new();
    let mut known = std::collections::BTreeSet::new();
    for group in config::groups(root) {
        for arg in items(root, &group).unwrap_or_default() {
            let item = item_name(arg);
            known.insert((group.clone(), item.clone()));
            match cfg.get(&group).and_then(|g| g.get(&item)) {
                Some(v) => out.push_str(&format!("{group}.{item} = {v}\n")),
                None if all => match default_of(arg) {
                    Some(d) => out.push_str(&format!("{group}.{item} = {d}  (default)\n")),
                    None => out.push_str(&format!("{group}.{item}\n")),
                },
                None => {}
            }
        }
    }
    for (group, entries) in cfg {
        for (item, v) in entries {
            if !known.contains(&(group.clone(), item.clone())) {
                out.push_str(&format!("{group}.{item} = {v}  (unknown: ignored)\n"));
            }
        }
    }
    out
}

fn default_of(arg: &clap::Arg) -> Option<String> {
    let d = arg.get_default_values();
    if d.is_empty() || matches!(arg.get_action(), clap::ArgAction::SetTrue) && d == ["false"] {
        return None;
    }
    Some(
        d.iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// `set k v`, `set k=v` or `set k = v`.
pub fn set_words(words: &[String]) -> Result<(String, String)> {
    let usage = || {
        EnvError::new(
            "give `set <group>.<item> <value>`, `set <group>.<item>=<value>` or `set <group>.<item> = <value>`",
        )
    };
    let (k, v) = match words {
        [kv] => kv.split_once('=').ok_or_else(usage)?,
        [k, v] => (k.as_str(), v.as_str()),
        [k, eq, v] if eq == "=" => (k.as_str(), v.as_str()),
        _ => return Err(usage().into()),
    };
    let (k, v) = (k.trim(), v.trim());
    if k.is_empty() || v.is_empty() {
        return Err(usage().into());
    }
    Ok((k.to_string(), v.to_string()))
}

/// The file of profile `name`, once the name is checked (letters, digits, `-`, `_`, `.`).
fn profile(name: &str) -> Result<std::path::PathBuf> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(EnvError::new(format!(
            "invalid profile name {name:?}: use letters, digits, '-', '_' and '.' only"
        ))
        .into());
    }
    Ok(config::profile_dir().join(name))
}

/// Asks on the terminal; false without one.
fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Error::io("reading the answer", e))?;
    Ok(answer.trim_start().starts_with(['Y', 'y']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_takes_kt_connects_three_forms() {
        let w = |s: &[&str]| set_words(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        let want = ("global.namespace".to_string(), "dev".to_string());
        assert_eq!(w(&["global.namespace", "dev"]).ok(), Some(want.clone()));
        assert_eq!(w(&["global.namespace=dev"]).ok(), Some(want.clone()));
        assert_eq!(w(&["global.namespace", "=", "dev"]).ok(), Some(want));
        for bad in [&["global.namespace"][..], &["a", "b", "c"], &["k="], &[]] {
            assert!(w(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn show_lists_what_is_set_and_with_all_every_item() {
        let root = Cli::command();
        let mut cfg = Config::new();
        cfg.entry("connect".into())
            .or_default()
            .insert("dns-cache-ttl".into(), "30".into());
        cfg.entry("connect".into())
            .or_default()
            .insert("dnsCacheTtl".into(), "30".into());
        let short = show(&root, &cfg, false);
        assert_eq!(
            short,
            "connect.dns-cache-ttl = 30\nconnect.dnsCacheTtl = 30  (unknown: ignored)\n"
        );
        let long = show(&root, &Config::new(), true);
        assert!(long.starts_with("global."), "{long}");
        assert!(
            long.contains("global.pod-creation-timeout = 60  (default)\n"),
            "{long}"
        );
        assert!(long.contains("global.namespace\n"), "{long}");
        assert!(
            long.contains("clean.threshold-in-minus = 5  (default)\n"),
            "{long}"
        );
        assert!(
            long.contains("connect.share-shadow\n"),
            "a switch: no default shown: {long}"
        );
        assert!(!long.contains("global.version"), "{long}");
        assert!(!long.contains("global.verbose"), "{long}");
    }
}
