//! Unit tests of `audit_tool` (kept in their own file): every kind of tampering is found at the right record.

use super::*;
use crate::audit::AuditLog;
use sequoia_openpgp::cert::prelude::*;
use serde_json::Map;
use std::time::{Duration, SystemTime};

fn cert() -> Cert {
    CertBuilder::general_purpose(Some("Alice <alice@example.com>"))
        .set_cipher_suite(CipherSuite::Cv25519)
        .set_creation_time(SystemTime::now() - Duration::from_secs(3600))
        .generate()
        .unwrap()
        .0
}

const ID: &str = "7d4c0a6e-5b1f-4f0e-9a53-2f1e9c0b8d11";

fn token(c: &Cert, id: &str) -> String {
    let payload = format!(
        "stepgate-token: 1\nid: {id}\ndatabase: app\nnot-after: 2099-01-01T00:00:00Z\nstatement: {} destructive \"DROP TABLE t\"\n",
        crate::token::payload::fingerprint_of("DROP TABLE t").unwrap()
    );
    String::from_utf8(
        crate::token::signed::sign_cleartext(
            payload.as_bytes(),
            std::slice::from_ref(c),
            SystemTime::now(),
        )
        .unwrap(),
    )
    .unwrap()
}

fn fields(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// A log of 5 records: held, token_set, authorized, executed, committed.
fn log(dir: &Path, c: &Cert) -> PathBuf {
    let log = AuditLog::open(dir).unwrap();
    let who = serde_json::json!([{"name": "alice", "fingerprint": c.fingerprint().to_hex(), "user_id": "Alice"}]);
    log.append(
        "held",
        fields(&[
            ("held_id", "abcd1234".into()),
            ("sql", "DROP TABLE t".into()),
        ]),
        false,
    )
    .unwrap();
    log.append(
        "token_set",
        fields(&[("token_id", ID.into()), ("token", token(c, ID).into())]),
        false,
    )
    .unwrap();
    log.append(
        "authorized",
        fields(&[
            ("token_id", ID.into()),
            ("sql", "DROP TABLE t".into()),
            ("signers", who.clone()),
        ]),
        true,
    )
    .unwrap();
    log.append(
        "executed",
        fields(&[("token_id", ID.into()), ("outcome", "DROP TABLE".into())]),
        false,
    )
    .unwrap();
    log.append("committed", fields(&[("token_id", ID.into())]), false)
        .unwrap();
    dir.join("audit.jsonl")
}

fn ring(c: &Cert) -> Keyring {
    Keyring {
        certs: vec![c.clone().strip_secret_key_material()],
    }
}

fn edit(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    f(&mut lines);
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn check(path: &Path, c: &Cert, head: Option<&(u64, String)>) -> Report {
    verify(&[path.to_path_buf()], Some(&ring(c)), head).unwrap()
}

#[test]
fn an_intact_log_verifies_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let c = cert();
    let p = log(dir.path(), &c);
    let r = check(&p, &c, None);
    assert!(r.ok, "{r:?}");
    assert_eq!((r.records, r.authorizations), (5, 1));
    assert_eq!(r.signers, ["alice"]);
    let text = render(&r);
    assert!(
        text.starts_with("ok: 5 records, 1 authorizations, signers: alice; head 5:sha256:"),
        "{text}"
    );
    let head = parse_head(&r.head).unwrap();
    assert!(check(&p, &c, Some(&head)).ok);
}

#[test]
fn every_tampering_is_named_at_its_record() {
    let c = cert();
    type Tamper = Box<dyn Fn(&mut Vec<String>)>;
    let cases: Vec<(&str, Tamper, u64, &str)> = vec![
        (
            "one byte of a statement",
            Box::new(|l| l[0] = l[0].replace("DROP TABLE t", "DROP TABLE u")),
            1,
            "hash mismatch",
        ),
        (
            "a record in the middle deleted",
            Box::new(|l| {
                l.remove(2);
            }),
            3,
            "record 3 is missing",
        ),
        (
            "two records swapped",
            Box::new(|l| l.swap(1, 2)),
            2,
            "reordered",
        ),
        (
            "a forged token",
            Box::new(|l| {
                let forged = token(&cert(), ID);
                let mut v: Value = serde_json::from_str(&l[1]).unwrap();
                v["token"] = forged.into();
                l[1] = serde_json::to_string(&v).unwrap();
            }),
            2,
            "signature invalid",
        ),
    ];
    for (what, f, seq, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        let p = log(dir.path(), &c);
        edit(&p, f);
        let r = check(&p, &c, None);
        assert!(!r.ok, "{what}: not detected");
        let e = r.error.clone().unwrap();
        assert_eq!(e.seq, seq, "{what}: {e:?}");
        assert!(e.problem.contains(needle), "{what}: {e:?}");
        assert!(
            render(&r).starts_with(&format!("BROKEN at record {seq} (")),
            "{}",
            render(&r)
        );
    }
}

#[test]
fn the_last_record_deleted_or_changed_needs_the_recorded_head() {
    let c = cert();
    let dir = tempfile::tempdir().unwrap();
    let p = log(dir.path(), &c);
    let head = parse_head(&check(&p, &c, None).head).unwrap();
    edit(&p, |l| {
        l.pop();
    });
    assert!(
        check(&p, &c, None).ok,
        "without a head, a shorter log is consistent"
    );
    let r = check(&p, &c, Some(&head));
    assert!(!r.ok);
    assert!(r.error.unwrap().problem.contains("cut short"));

    let dir = tempfile::tempdir().unwrap();
    let p = log(dir.path(), &c);
    let head = parse_head(&check(&p, &c, None).head).unwrap();
    edit(&p, |l| l[4] = l[4].replace("committed", "rolled_back"));
    let r = check(&p, &c, Some(&head));
    let e = r.error.unwrap();
    assert_eq!(e.seq, 5);
    assert!(
        e.problem.contains("differs from the recorded head"),
        "{e:?}"
    );
}

#[test]
fn an_authorization_without_its_token_is_found() {
    let c = cert();
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    log.append("authorized", fields(&[("token_id", "nope".into())]), false)
        .unwrap();
    let r = check(&dir.path().join("audit.jsonl"), &c, None);
    assert_eq!(r.error.unwrap().seq, 1);
}

#[test]
fn show_filters_by_event() {
    let c = cert();
    let dir = tempfile::tempdir().unwrap();
    let p = log(dir.path(), &c);
    let out = show(
        &[p],
        &ShowFilter {
            event: Some("authorized".into()),
            ..ShowFilter::default()
        },
    )
    .unwrap();
    assert!(out.contains("authorized"), "{out}");
    assert!(!out.contains(" held "), "{out}");
    assert!(out.contains("(1 records)"), "{out}");
}
