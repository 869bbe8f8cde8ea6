//! The classifier against its corpus (fixtures/classify/cases.txt), plus the properties the gate relies on:
//! the cache never changes a verdict, and reformatting never changes a class or a fingerprint.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cache::CachedClassifier;
use super::lex::{lex, Kind};
use super::*;

const CORPUS: &str = include_str!("../../fixtures/classify/cases.txt");

fn corpus() -> Vec<(Class, String)> {
    CORPUS
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (class, sql) = l.split_once(" | ").expect("`class | sql`");
            (class.trim().parse().unwrap(), sql.replace("\\n", "\n"))
        })
        .collect()
}

fn max_class(c: &Classifier, sql: &str, s: &LexSettings) -> Class {
    match c.analyze(sql, s) {
        Ok(stmts) => stmts
            .iter()
            .map(|a| a.verdict.class)
            .max()
            .unwrap_or(Class::Read),
        Err(_) => Class::Unparsed,
    }
}

fn guarded(c: Class) -> bool {
    Class::DEFAULT_GUARDED.contains(&c)
}

#[test]
fn corpus_is_classified_as_designed() {
    let c = Classifier::default();
    let s = LexSettings::default();
    let cases = corpus();
    assert!(cases.len() >= 200, "the corpus has {} cases", cases.len());
    let mut wrong = Vec::new();
    let mut fail_open = Vec::new();
    for (expected, sql) in &cases {
        let got = max_class(&c, sql, &s);
        if got != *expected {
            wrong.push(format!("{expected:>11} expected, got {got:<11} {sql}"));
        }
        if guarded(*expected) && !guarded(got) {
            fail_open.push(sql.clone());
        }
    }
    println!("{} cases, {} misclassified", cases.len(), wrong.len());
    assert!(
        fail_open.is_empty(),
        "FAIL-OPEN (guarded statement passed): {fail_open:#?}"
    );
    assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
}

#[test]
fn cache_never_changes_a_verdict() {
    let c = Classifier::default();
    let cached = CachedClassifier::new(c.clone(), 64);
    let s = LexSettings::default();
    let mut inputs: Vec<String> = corpus().into_iter().map(|(_, sql)| sql).collect();
    // Shapes whose verdict depends on a literal, looked up back to back.
    for pair in [
        ("DELETE FROM t WHERE 1=2", "DELETE FROM t WHERE 1=1"),
        (
            "UPDATE t SET x = 1 WHERE 'a' = 'b'",
            "UPDATE t SET x = 1 WHERE 'a' = 'a'",
        ),
        (
            "EXPLAIN (ANALYZE 0) DELETE FROM t",
            "EXPLAIN (ANALYZE 1) DELETE FROM t",
        ),
        (
            "EXPLAIN (ANALYZE 'off') DELETE FROM t",
            "EXPLAIN (ANALYZE 'on') DELETE FROM t",
        ),
        ("VACUUM (FULL 0) t", "VACUUM (FULL 1) t"),
        (
            "UPDATE t SET names[1] = 'x' WHERE 1 = 2",
            "UPDATE t SET names[1] = 'x' WHERE 1 = 1",
        ),
        (
            "select * from t where id = 1",
            "select * from t where id = 2",
        ),
    ] {
        inputs.push(pair.0.into());
        inputs.push(pair.1.into());
        inputs.push(pair.0.into());
    }
    for round in 0..3 {
        for sql in &inputs {
            let direct = max_class(&c, sql, &s);
            let via_cache = cached.lookup(sql.as_bytes(), &s, 1).max;
            assert_eq!(direct, via_cache, "round {round}: {sql}");
        }
    }
    let (exact, shapes) = cached.len();
    assert!(exact <= 64 && shapes <= 64, "bounded: {exact} {shapes}");
}

#[test]
fn new_literals_reuse_the_shape() {
    let cached = CachedClassifier::new(Classifier::default(), 1000);
    let s = LexSettings::default();
    for i in 0..100 {
        let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i}");
        assert_eq!(cached.lookup(sql.as_bytes(), &s, 1).max, Class::Read);
    }
    // 100 exact keys, one shape: the parse happened once.
    assert_eq!(cached.len().1, 1);
    // Another generation or other lexing settings never reuse an entry.
    cached.lookup(b"SELECT 1", &s, 2);
    let off = LexSettings {
        standard_conforming_strings: false,
        ..s.clone()
    };
    cached.lookup(b"SELECT 1", &off, 2);
    assert_eq!(cached.len().1, 3);
}

/// Rewrites `sql` with different whitespace, comments between tokens and other keyword case.
fn reformat(sql: &str, rng: &mut StdRng) -> String {
    let tokens = lex(sql, true).unwrap();
    let mut out = String::new();
    for t in tokens {
        match t.kind {
            Kind::Whitespace => {}
            Kind::Comment => {
                out.push_str(t.text);
                out.push('\n');
                continue;
            }
            Kind::Word => {
                if !out.is_empty() {
                    out.push_str(gap(rng));
                }
                out.extend(t.text.chars().map(|c| {
                    if rng.random_bool(0.5) {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                }));
                continue;
            }
            _ => {}
        }
        if t.kind != Kind::Whitespace {
            if !out.is_empty() {
                out.push_str(gap(rng));
            }
            out.push_str(t.text);
        }
    }
    out
}

fn gap(rng: &mut StdRng) -> &'static str {
    [
        " ",
        "  ",
        "\n",
        "\t",
        " /* c */ ",
        "\n-- note\n",
        " /* a /* nested */ b */ ",
        "\r\n ",
    ][rng.random_range(0..8)]
}

#[test]
fn reformatting_changes_neither_class_nor_fingerprint() {
    let c = Classifier::default();
    let s = LexSettings::default();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for (_, sql) in corpus() {
        let Ok(orig) = c.analyze(&sql, &s) else {
            continue;
        };
        for _ in 0..5 {
            let other = reformat(&sql, &mut rng);
            let again = c
                .analyze(&other, &s)
                .unwrap_or_else(|e| panic!("{other:?}: {e}"));
            assert_eq!(orig.len(), again.len(), "{sql:?} vs {other:?}");
            for (a, b) in orig.iter().zip(&again) {
                assert_eq!(a.verdict.class, b.verdict.class, "{sql:?} vs {other:?}");
                assert_eq!(a.fingerprint(), b.fingerprint(), "{sql:?} vs {other:?}");
            }
        }
    }
}

#[test]
fn fingerprint_vectors() {
    #[derive(serde::Deserialize)]
    struct V {
        sql: String,
        fingerprint: String,
    }
    let vectors: Vec<V> =
        serde_json::from_str(include_str!("../../fixtures/fingerprints.json")).unwrap();
    assert!(vectors.len() >= 10);
    let c = Classifier::default();
    for v in vectors {
        let a = c.analyze(&v.sql, &LexSettings::default()).unwrap();
        assert_eq!(a.len(), 1, "{}", v.sql);
        assert_eq!(a[0].fingerprint(), v.fingerprint, "{}", v.sql);
    }
}

#[test]
fn backslashes_with_standard_conforming_strings_off() {
    let c = Classifier::default();
    let off = LexSettings {
        standard_conforming_strings: false,
        ..Default::default()
    };
    // The server reads this as one statement with a literal; sqlparser would read a DROP after it.
    let trap = "select 'a\\'; drop table t; --'";
    assert!(c.analyze(trap, &off).is_err());
    assert_eq!(max_class(&c, trap, &off), Class::Unparsed);
    // A backslash that changes no boundary is fine.
    assert_eq!(max_class(&c, "select 'a\\nb'", &off), Class::Read);
    // With the setting believed on, the same text is still read both ways (a SET in flight may turn it
    // off): the readings differ, so it is held as unparsed.
    assert!(c.analyze(trap, &LexSettings::default()).is_err());
    assert_eq!(
        max_class(&c, trap, &LexSettings::default()),
        Class::Unparsed
    );
    // A high byte followed by 0x5c may be one SJIS/GBK character if client_encoding is changing.
    assert!(c
        .analyze_bytes(
            b"select E'\xe4\xb8\xad\\'; drop table t; --'",
            &LexSettings::default()
        )
        .is_err());
}

#[test]
fn encodings() {
    let c = Classifier::default();
    let latin1 = LexSettings {
        client_encoding: "LATIN1".into(),
        ..Default::default()
    };
    let (_, v) = c.analyze_bytes(b"select '\xe9t\xe9'", &latin1).unwrap();
    assert_eq!(v[0].0.class, Class::Read);
    let (_, v) = c.analyze_bytes(b"drop table \"caf\xe9\"", &latin1).unwrap();
    assert_eq!(v[0].0.class, Class::Destructive);
    // Not valid UTF-8 in a UTF8 session: unreadable, hence unparsed by the cache.
    assert!(c
        .analyze_bytes(b"select '\xe9'", &LexSettings::default())
        .is_err());
    let cached = CachedClassifier::new(c.clone(), 10);
    assert_eq!(
        cached
            .lookup(b"select '\xe9'", &LexSettings::default(), 1)
            .max,
        Class::Unparsed
    );
    // SJIS: 0x95 0x5c is one character whose second byte is a backslash.
    let sjis = LexSettings {
        client_encoding: "SJIS".into(),
        standard_conforming_strings: false,
    };
    // The server converts to its own encoding before it scans, so 0x5c there is no backslash: the
    // character-wise reading is the server's, and the DROP after the literal is seen.
    match c.analyze_bytes(b"select '\x95\x5c'; drop table t; --'", &sjis) {
        Err(_) => {}
        Ok((_, v)) => assert_eq!(v.iter().map(|x| x.0.class).max(), Some(Class::Destructive)),
    }
    assert!(decode(b"select '\x82\xa0'", &sjis).is_ok());
    // With standard_conforming_strings on, both readings end the literal at the same quote: the DROP is seen.
    let sjis_on = LexSettings {
        standard_conforming_strings: true,
        ..sjis
    };
    let (_, v) = c
        .analyze_bytes(b"select '\x95\x5c'; drop table t; --'", &sjis_on)
        .unwrap();
    assert_eq!(v[1].0.class, Class::Destructive);
}

#[test]
fn dangerous_function_list_is_configurable() {
    let c = Classifier::new(["my_danger".to_string(), "pg_foo_*".to_string()]);
    let s = LexSettings::default();
    assert_eq!(max_class(&c, "select My_Danger(1)", &s), Class::Privileged);
    assert_eq!(max_class(&c, "select pg_foo_bar()", &s), Class::Privileged);
    assert_eq!(
        max_class(&c, "select pg_terminate_backend(1)", &s),
        Class::Read
    );
    // A name that is not called is just a name.
    assert_eq!(max_class(&c, "select my_danger from t", &s), Class::Read);
}

/// fixtures/app-queries/ holds only benign application traffic: every hold there is a false hold.
#[test]
fn app_traffic_false_hold_rate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/app-queries");
    let c = Classifier::default();
    let s = LexSettings::default();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    let (mut total, mut held, mut fallback) = (0usize, Vec::new(), 0usize);
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let stmts = c
            .analyze(&text, &s)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for a in stmts {
            total += 1;
            fallback += a.verdict.fallback as usize;
            if guarded(a.verdict.class) {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                held.push(format!(
                    "{name}: {} {}",
                    a.verdict.class,
                    a.text.replace('\n', " ")
                ));
            }
        }
    }
    let rate = held.len() as f64 / total as f64;
    println!(
        "app traffic: {total} statements in {} files, {} false holds ({:.2} %), {fallback} sqlparser could not parse (PostgreSQL's tree alone judged them)",
        files.len(),
        held.len(),
        rate * 100.0
    );
    for h in &held {
        println!("  held: {h}");
    }
    assert!(total >= 300, "the corpus has {total} statements");
    assert!(
        rate <= 0.02,
        "false-hold rate {:.2} % is above 2 %",
        rate * 100.0
    );
}

/// Untrusted text never panics the classifier: random splices of corpus fragments and odd bytes.
#[test]
fn random_text_never_panics() {
    let c = Classifier::default();
    let cached = CachedClassifier::new(c.clone(), 256);
    let mut rng = StdRng::seed_from_u64(42);
    let corpus: Vec<String> = corpus().into_iter().map(|(_, s)| s).collect();
    let odd = [
        "'", "\"", "$$", "$a$", "/*", "*/", "--", ";", "(", ")", "[", "]", "E'\\", "U&\"", "\\",
        "::", "é", "\u{0}", "$1", ".",
    ];
    for i in 0..3_000 {
        let mut text = String::new();
        for _ in 0..rng.random_range(1..6) {
            if rng.random_bool(0.5) {
                let s = &corpus[rng.random_range(0..corpus.len())];
                let a = rng.random_range(0..=s.len());
                let b = rng.random_range(a..=s.len());
                if let Some(piece) = s.get(a..b) {
                    text.push_str(piece);
                }
            } else {
                text.push_str(odd[rng.random_range(0..odd.len())]);
            }
        }
        let settings = LexSettings {
            standard_conforming_strings: i % 3 != 0,
            client_encoding: ["UTF8", "LATIN1", "SJIS", "SQL_ASCII"][i % 4].into(),
        };
        let _ = c.analyze(&text, &settings);
        let _ = cached.lookup(text.as_bytes(), &settings, 1);
        let mut bytes = text.clone().into_bytes();
        if !bytes.is_empty() {
            let k = rng.random_range(0..bytes.len());
            bytes[k] = rng.random();
        }
        let _ = cached.lookup(&bytes, &settings, 1);
        let _ = crate::gate::redact(&text);
    }
}

#[test]
fn a_literal_naming_a_stepgate_setting_never_shares_a_shape() {
    assert!(crate::classify::mentions_stepgate_text("'stepgate.token'"));
    assert!(crate::classify::mentions_stepgate_text(
        "'x StepGate.Token'"
    ));
    assert!(crate::classify::mentions_stepgate_text(
        "E'STEPGATE\\x2etoken'"
    ));
    assert!(crate::classify::mentions_stepgate_text(
        "U&'stepgate\\002etoken'"
    ));
    assert!(!crate::classify::mentions_stepgate_text("'stepgate'"));
    assert!(!crate::classify::mentions_stepgate_text("'app.setting'"));
    assert!(!crate::classify::mentions_stepgate_text("''"));
    let cached = CachedClassifier::new(Classifier::default(), 1000);
    let s = LexSettings::default();
    // The harmless spelling is cached first; the same shape naming a stepgate setting must not reuse it.
    let plain = cached.lookup(b"SELECT set_config('app.x', 'v', false)", &s, 1);
    assert!(!plain.attention);
    let named = cached.lookup(b"SELECT set_config('Stepgate.Token', 'v', false)", &s, 1);
    assert!(named.attention, "{named:?}");
}

/// Found by the differential fuzzer: the literal after UESCAPE decides what a `U&` identifier names, so two
/// strings that differ only there must never share a cached verdict.
#[test]
fn the_uescape_literal_is_part_of_the_shape() {
    let c = Classifier::default();
    let cached = CachedClassifier::new(c, 100);
    let settings = LexSettings::default();
    let harmless = "SELECT U&\"pg_!0074erminate_backend\" UESCAPE '#' (1)";
    let attack = "SELECT U&\"pg_!0074erminate_backend\" UESCAPE '!' (1)";
    assert_eq!(
        cached.lookup(harmless.as_bytes(), &settings, 1).max,
        Class::Read
    );
    assert_eq!(
        cached.lookup(attack.as_bytes(), &settings, 1).max,
        Class::Privileged
    );
}

/// Found by the differential fuzzer: libpg_query left standard_conforming_strings off on its thread after a
/// failed parse with it off, and later scans read backslashes as escapes. Whatever came before, the same
/// text is judged the same way.
#[test]
fn a_failed_parse_with_standard_conforming_strings_off_leaves_no_trace() {
    let c = Classifier::default();
    let settings = LexSettings::default();
    let probe = "SELECT 'a\\' AS x";
    let before = c.analyze(probe, &settings).map(|v| v.len());
    // Fails with standard_conforming_strings off (U& strings are not allowed then).
    assert!(c.analyze("SELECT U&'\\0061'", &settings).is_err());
    assert_eq!(c.analyze(probe, &settings).map(|v| v.len()), before);
    let tokens: Vec<_> = lex::lex(probe, true)
        .unwrap()
        .into_iter()
        .map(|t| t.text)
        .collect();
    assert_eq!(tokens, ["SELECT", "'a\\'", "AS", "x"]);
}

#[test]
fn set_stepgate_token_takes_every_string_spelling() {
    use super::session_cmd::{kind_of, SessionCommand};
    for (sql, value) in [
        ("SET stepgate.token = 'a''b'", "a'b"),
        (r"SET stepgate.token = E'a\\b\n'", "a\\b\n"),
        (r"SET stepgate.token TO U&'\0061b'", "ab"),
        (r"SET stepgate.token = U&'!0061b' UESCAPE '!'", "ab"),
        ("SET stepgate.token = $t$x'y$t$", "x'y"),
    ] {
        let tokens = lex::significant(&lex::lex(sql, true).unwrap());
        match kind_of(&tokens) {
            SessionCommand::Set { name, value: v } => {
                assert_eq!(name, "stepgate.token", "{sql}");
                assert_eq!(v, value, "{sql}");
            }
            _ => panic!("{sql}: not a SET"),
        }
    }
    for sql in [
        "SET stepgate.token = B'101'",
        "SET stepgate.token = 'a' || 'b'",
    ] {
        let tokens = lex::significant(&lex::lex(sql, true).unwrap());
        assert!(matches!(kind_of(&tokens), SessionCommand::Mention), "{sql}");
    }
}
