//! Unit tests of `config` (kept in their own file).

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new("/etc/sg"), "stepgate.toml")
}

#[test]
fn defaults_and_relative_paths() {
    let c =
        parse("state_dir = \"state\"\n[tls]\ncert = \"c.pem\"\nkey = \"/abs/k.pem\"\n").unwrap();
    assert_eq!(c.listen, DEFAULT_LISTEN);
    assert_eq!(c.state_dir, PathBuf::from("/etc/sg/state"));
    let tls = c.tls.unwrap();
    assert_eq!(tls.cert, PathBuf::from("/etc/sg/c.pem"));
    assert_eq!(tls.key, PathBuf::from("/abs/k.pem"));
    assert_eq!(c.max_message_size, 1 << 30);
    assert_eq!(c.startup_timeout, Duration::from_secs(10));
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let err = parse("listen = \"127.0.0.1:1\"\nlsten = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("stepgate.toml"), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("lsten"), "{err}");
}

#[test]
fn bad_values_name_their_line() {
    let err = parse("\nstartup_timeout = \"ten\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 2") && err.contains("startup_timeout"),
        "{err}"
    );
    let err = parse("max_message_size = \"12 parsecs\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_message_size"), "{err}");
    let err = parse("upstream = \"nohost\"").unwrap_err().to_string();
    assert!(err.contains("upstream"), "{err}");
    let err = parse("upstream_tls = \"sometimes\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("upstream_tls"), "{err}");
}

#[test]
fn overrides_win() {
    let o = Overrides {
        listen: Some("0.0.0.0:7000".into()),
        upstream: Some("db:5433".into()),
        ..Default::default()
    };
    let c = parse("listen = \"127.0.0.1:1\"")
        .unwrap()
        .with_overrides(&o)
        .unwrap();
    assert_eq!(
        (c.listen.as_str(), c.upstream.as_str()),
        ("0.0.0.0:7000", "db:5433")
    );
}

#[test]
fn rules_first_match_and_unparsed_stays_guarded() {
    let c = parse(
        "[[rule]]\ndatabase = \"scratch*\"\nguard = []\n\n[[rule]]\ndatabase = \"prod\"\nuser = \"etl\"\nguard = [\"destructive\"]\n",
    )
    .unwrap();
    let scratch = c.rule_for("scratch_1", "anyone");
    assert!(scratch.guard.is_empty());
    assert!(
        c.is_guarded(&scratch, Class::Unparsed),
        "unparsed is guarded unless allowed"
    );
    assert!(!c.is_guarded(&scratch, Class::Destructive));
    let etl = c.rule_for("prod", "etl");
    assert!(c.is_guarded(&etl, Class::Destructive) && !c.is_guarded(&etl, Class::Ddl));
    let other = c.rule_for("prod", "alice");
    assert_eq!(other, Rule::default());
    let err = parse("[[rule]]\nguard = [\"everything\"]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("guard") || err.contains("everything"), "{err}");
    let allow = parse("allow_unparsed = true\n[[rule]]\nguard = []\n").unwrap();
    assert!(!allow.is_guarded(&allow.rule_for("x", "y"), Class::Unparsed));
}

#[test]
fn sizes() {
    assert_eq!(parse_size("1GiB"), Some(1 << 30));
    assert_eq!(parse_size("64 kB"), Some(65536));
    assert_eq!(parse_size("100"), Some(100));
    assert_eq!(parse_size("1.5GB"), None);
    assert_eq!(split_host_port("[::1]:5432"), Some(("::1", 5432)));
}
