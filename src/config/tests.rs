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

const ALICE: &str = "80719D6BD335408F91BFB4C64179D3387B2550A8";

#[test]
fn signers_and_token_rules() {
    let c = parse(&format!(
        "keyring = \"keys\"\ninstance = \"prod-eu1\"\n\
         [[signer]]\nname = \"alice\"\nfingerprint = \"{}\"\n\
         [[signer]]\nname = \"bob\"\nfingerprint = \"{}\"\ndatabases = [\"app\"]\nclasses = [\"ddl\"]\n\
         [[rule]]\ndatabase = \"app\"\nsignatures = 2\nmax_token_lifetime = \"15m\"\n",
        // Spaces and lowercase, as people paste them.
        "8071 9d6b d335 408f 91bf  b4c6 4179 d338 7b25 50a8",
        "C784889B26214579DF995BA0C5AFC13BB5CDBE8B"
    ))
    .unwrap();
    assert_eq!(c.keyring, Some(PathBuf::from("/etc/sg/keys")));
    assert_eq!(c.instance.as_deref(), Some("prod-eu1"));
    assert_eq!(c.signers[0].fingerprint, ALICE);
    assert_eq!(c.signers[0].databases, ["*"]);
    assert_eq!(c.signers[0].classes, Class::DEFAULT_GUARDED);
    assert_eq!(c.signers[1].classes, [Class::Ddl]);
    let r = c.rule_for("app", "x");
    assert_eq!(r.signatures, 2);
    assert_eq!(r.max_token_lifetime, Duration::from_secs(900));
    let d = c.rule_for("other", "x");
    assert_eq!(d.signatures, 1);
    assert_eq!(d.max_token_lifetime, Duration::from_secs(3600));
}

#[test]
fn unsatisfiable_or_broken_signer_policy_is_refused() {
    let signer = |name: &str, extra: &str| {
        format!("[[signer]]\nname = \"{name}\"\nfingerprint = \"{ALICE}\"\n{extra}")
    };
    for (text, needle) in [
        (
            format!(
                "keyring = \"k\"\n{}[[rule]]\nsignatures = 2\n",
                signer("a", "")
            ),
            "needs 2 signers but only 1",
        ),
        (
            // bob may sign only for `other`: he cannot count for `app`.
            format!(
                "keyring = \"k\"\n{}{}[[rule]]\ndatabase = \"app\"\nsignatures = 2\n",
                signer("a", ""),
                signer("b", "databases = [\"other\"]\n")
            ),
            "needs 2 signers but only 1",
        ),
        (
            "[[rule]]\nsignatures = 2\n".to_string(),
            "needs 2 signers but only 0",
        ),
        (signer("a", ""), "no keyring"),
        (
            format!("keyring = \"k\"\n{}{}", signer("a", ""), signer("a", "")),
            "named twice",
        ),
        (
            "keyring = \"k\"\n[[signer]]\nname = \"x\"\nfingerprint = \"abc\"\n".to_string(),
            "is not a key fingerprint",
        ),
        (
            format!(
                "keyring = \"k\"\n{}[[rule]]\nsignatures = 0\n",
                signer("a", "")
            ),
            "at least 1",
        ),
        (
            format!(
                "keyring = \"k\"\n{}",
                signer("a", "classes = [\"ddl\", \"bogus\"]\n")
            ),
            "bogus",
        ),
    ] {
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text}\n=> {err}");
    }
}

#[test]
fn wait_mode_needs_the_console_and_a_sane_timeout() {
    let c = parse(
        "[admin]\nusers = [\"dba\"]\n\
         [[rule]]\ndatabase = \"app\"\non_hold = \"wait\"\nwait_timeout = \"5m\"\n",
    )
    .unwrap();
    let r = c.rule_for("app", "x");
    assert_eq!(r.on_hold, OnHold::Wait);
    assert_eq!(r.wait_timeout, Duration::from_secs(300));
    let d = c.rule_for("other", "x");
    assert_eq!(d.on_hold, OnHold::Refuse);
    assert_eq!(d.wait_timeout, Duration::from_secs(60));
    let err = parse("[[rule]]\ndatabase = \"app\"\non_hold = \"wait\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("configure [admin]"), "{err}");
    for t in ["0s", "2h"] {
        let err = parse(&format!(
            "[admin]\nusers = [\"dba\"]\n[[rule]]\non_hold = \"wait\"\nwait_timeout = \"{t}\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("between 1s and 1h"), "{t}: {err}");
    }
    let err = parse("[[rule]]\non_hold = \"sleep\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("refuse") && err.contains("wait"), "{err}");
}
