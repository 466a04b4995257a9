use super::*;

use clap::{CommandFactory, FromArgMatches};

use crate::cli::{Cli, Command as Sub};

fn cfg(entries: &[(&str, &str, &str)]) -> Config {
    let mut c = Config::new();
    for (g, i, v) in entries {
        c.entry(g.to_string())
            .or_default()
            .insert(i.to_string(), v.to_string());
    }
    c
}

fn parse_with(c: &Config, line: &[&str]) -> Cli {
    let (cmd, warnings) = apply(Cli::command(), c);
    assert!(warnings.is_empty(), "{warnings:?}");
    let m = cmd.try_get_matches_from(line).expect("parses");
    Cli::from_arg_matches(&m).expect("fits")
}

#[test]
fn kt_connects_yaml_reads_with_any_scalar_as_text() {
    let text = "global:\n    namespace: dev\n    pod-creation-timeout: 90\nconnect:\n    share-shadow: true\n    dns-cache-ttl: \"30\"\nclean: {}\n";
    let c = parse(text).expect("valid");
    assert_eq!(c["global"]["namespace"], "dev");
    assert_eq!(c["global"]["pod-creation-timeout"], "90");
    assert_eq!(c["connect"]["share-shadow"], "true");
    assert_eq!(c["connect"]["dns-cache-ttl"], "30");
    assert!(c["clean"].is_empty());
    assert_eq!(parse("").expect("empty"), Config::new());
    assert_eq!(parse("{}\n").expect("empty map"), Config::new());
    assert!(parse("global: [1, 2]").is_err());
    assert!(parse("global:\n  namespace: [a]").is_err());
    assert_eq!(parse(&render(&c)).expect("round trip"), c);
}

#[test]
fn config_values_are_flag_defaults_and_the_command_line_wins() {
    let c = cfg(&[
        ("global", "namespace", "dev"),
        ("global", "pod-creation-timeout", "90"),
        ("connect", "share-shadow", "true"),
        ("connect", "exclude-ips", "10.1.0.0/16,10.2.0.0/16"),
        ("exchange", "expose", "8080"),
        ("clean", "threshold-in-minus", "15"),
    ]);
    let cli = parse_with(&c, &["ktctl", "connect"]);
    assert_eq!(cli.global.namespace.as_deref(), Some("dev"));
    assert_eq!(cli.global.pod_creation_timeout, 90);
    let Sub::Connect(a) = &cli.command else {
        panic!("connect")
    };
    assert!(a.share_shadow);
    assert_eq!(a.exclude_ips.len(), 2, "split as the flag splits");

    let cli = parse_with(&c, &["ktctl", "-n", "prod", "connect"]);
    assert_eq!(cli.global.namespace.as_deref(), Some("prod"));
    let cli = parse_with(&c, &["ktctl", "connect", "--namespace", "qa"]);
    assert_eq!(cli.global.namespace.as_deref(), Some("qa"));

    let cli = parse_with(&c, &["ktctl", "exchange", "nginx"]);
    let Sub::Exchange(a) = &cli.command else {
        panic!("exchange")
    };
    assert_eq!(
        a.expose.expose.0[0].remote, 8080,
        "a required flag given by the config"
    );
    let cli = parse_with(&c, &["ktctl", "exchange", "nginx", "--expose", "9090"]);
    let Sub::Exchange(a) = &cli.command else {
        panic!("exchange")
    };
    assert_eq!(a.expose.expose.0[0].remote, 9090);

    let cli = parse_with(&c, &["ktctl", "clean"]);
    let Sub::Clean(a) = &cli.command else {
        panic!("clean")
    };
    assert_eq!(a.threshold_in_minus, 15);
}

#[test]
fn unknown_items_and_bad_values_are_skipped_with_a_warning() {
    let c = cfg(&[
        ("global", "namespace", "dev"),
        ("global", "no-such-item", "x"),
        ("nosuchgroup", "a", "b"),
        ("connect", "dns-cache-ttl", "lots"),
        ("connect", "share-shadow", "maybe"),
    ]);
    let (cmd, warnings) = apply(Cli::command(), &c);
    assert_eq!(warnings.len(), 4, "{warnings:#?}");
    assert!(warnings.iter().any(|w| w.contains("global.no-such-item")));
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("'lots' is not a valid value for --dnsCacheTtl"))
    );
    let m = cmd
        .try_get_matches_from(["ktctl", "connect"])
        .expect("still parses");
    let cli = Cli::from_arg_matches(&m).expect("fits");
    assert_eq!(cli.global.namespace.as_deref(), Some("dev"));
}

#[test]
fn items_resolve_by_group_and_dashed_name_as_kt_connect_names_them() {
    let root = Cli::command();
    for key in [
        "global.namespace",
        "global.image-pull-secret",
        "global.pod-quota",
        "global.port-forward-timeout",
        "connect.dns-cache-ttl",
        "connect.include-ips",
        "exchange.recover-wait-time",
        "mesh.version-mark",
        "mesh.router-image",
        "preview.external",
        "clean.threshold-in-minus",
    ] {
        resolve(&root, key).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    for (key, why) in [
        ("namespace", "is invalid"),
        ("global.namespace.x", "is invalid"),
        ("nosuch.namespace", "group 'nosuch' does not exist"),
        ("connect.dnsCacheTtl", "does not exist in group 'connect'"),
        ("global.version", "does not exist"),
        ("global.verbose", "does not exist"),
        ("exchange.target", "does not exist"),
    ] {
        let e = resolve(&root, key).expect_err(key);
        assert!(e.contains(why), "{key}: {e}");
    }
    let (_, arg) = resolve(&root, "connect.dns-cache-ttl").expect("item");
    assert!(check(arg, "30").is_ok());
    assert!(check(arg, "-1").is_err());
    let (_, arg) = resolve(&root, "exchange.mode").expect("item");
    assert!(check(arg, "scale").is_ok());
    assert!(check(arg, "sideways").is_err());
    let (_, arg) = resolve(&root, "preview.external").expect("item");
    assert!(check(arg, "true").is_ok());
    assert!(check(arg, "yes please").is_err());
}
