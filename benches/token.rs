//! Token costs: verifying a token when a session sets it (cleartext-signed and inline-signed, ed25519 and
//! rsa3072 keys from fixtures/keys), the per-statement authorization check once it is verified, and the
//! audit append that records it (with and without fsync).
//! Run: `cargo bench --bench token`.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use sequoia_openpgp::parse::Parse;
use sequoia_openpgp::Cert;
use stepgate::classify::{Class, Classifier};
use stepgate::config::{Config, Rule};
use stepgate::gate::{Registry, SessionFields};
use stepgate::proxy::authz::Grant;
use stepgate::proxy::gate::GateContext;
use stepgate::token::payload::{fingerprint_of, Payload, StatementGrant};
use stepgate::token::signed::{sign_cleartext, sign_inline, Keyring};
use stepgate::token::{ActiveToken, Policy, SignerPolicy};

const SQL: &str = "DROP TABLE staging_orders";

fn keys() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/keys")
}

fn secret(name: &str) -> Cert {
    Cert::from_file(keys().join(format!("{name}.sec.asc"))).unwrap()
}

fn payload() -> String {
    Payload {
        id: "7d4c0a6e-5b1f-4f0e-9a53-2f1e9c0b8d11".into(),
        instance: None,
        database: "app".into(),
        user: None,
        not_before: None,
        not_after: SystemTime::now() + Duration::from_secs(1800),
        statements: vec![StatementGrant {
            fingerprint: fingerprint_of(SQL).unwrap(),
            class: Class::Destructive,
            sql: SQL.into(),
        }],
        reason: Some("PROJ-142 retire the staging table".into()),
    }
    .render()
}

fn policy() -> Policy {
    let keyring = Keyring::load(&keys().join("keyring")).unwrap();
    let fpr = |n: &str| {
        std::fs::read_to_string(keys().join("fingerprints.txt"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{n} ")).map(str::to_string))
            .unwrap()
    };
    let signers = ["alice", "bob"]
        .iter()
        .map(|n| SignerPolicy {
            name: n.to_string(),
            fingerprint: fpr(n),
            databases: vec!["*".into()],
            classes: Class::DEFAULT_GUARDED.to_vec(),
        })
        .collect();
    Policy {
        keyring,
        signers,
        instance: None,
    }
}

fn verify(c: &mut Criterion) {
    let policy = policy();
    let rule = Rule::default();
    let classifier = Classifier::default();
    let text = payload();
    let mut g = c.benchmark_group("token verify");
    for (key, name) in [("alice", "ed25519"), ("bob", "rsa3072")] {
        let cert = secret(key);
        let clear = sign_cleartext(
            text.as_bytes(),
            std::slice::from_ref(&cert),
            SystemTime::now(),
        )
        .unwrap();
        let inline = sign_inline(
            text.as_bytes(),
            std::slice::from_ref(&cert),
            SystemTime::now(),
            true,
        )
        .unwrap();
        for (form, token) in [("clearsigned", &clear), ("inline", &inline)] {
            assert!(policy
                .verify(token, &rule, &classifier, "app", "u", SystemTime::now())
                .is_ok());
            g.bench_function(format!("{form} {name}"), |b| {
                b.iter(|| {
                    policy
                        .verify(
                            black_box(token),
                            &rule,
                            &classifier,
                            "app",
                            "u",
                            SystemTime::now(),
                        )
                        .unwrap()
                })
            });
        }
    }
    g.finish();
}

fn authorize(c: &mut Criterion) {
    let mut ctx = GateContext::new(Config::default(), Registry::new(None), false);
    ctx.policy = policy();
    let rule = Rule::default();
    let text = payload();
    let token = sign_cleartext(text.as_bytes(), &[secret("alice")], SystemTime::now()).unwrap();
    let auth = ctx
        .policy
        .verify(
            &token,
            &rule,
            &Classifier::default(),
            "app",
            "u",
            SystemTime::now(),
        )
        .unwrap();
    let mut active = ActiveToken::new(auth, token, ctx.generation);
    // Enough uses for every iteration: what is measured is the check, not running out.
    for v in active.listed.values_mut() {
        *v = u32::MAX;
    }
    let grants = vec![Grant {
        index: 0,
        fingerprint: fingerprint_of(SQL).unwrap(),
        sql: SQL.into(),
        token: Some(Arc::new(active)),
    }];
    let session = SessionFields::default();
    c.bench_function(
        "authorize one statement (verified token, no audit write)",
        |b| {
            b.iter(|| {
                ctx.authorize(
                    &session,
                    &rule,
                    black_box(&grants),
                    Class::Destructive,
                    None,
                )
                .unwrap()
            })
        },
    );
}

/// One `authorized`-sized record appended to the hash-chained log: buffered, and fsync'd (what the last
/// record of a guarded message costs before the message is forwarded).
fn audit_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let log = stepgate::audit::AuditLog::open(dir.path()).unwrap();
    use stepgate::audit::event::{AuditEvent, Signer, Use};
    let event = AuditEvent::Authorized(Use {
        session: stepgate::audit::SessionFields {
            user: "app".into(),
            database: "prod".into(),
            ..Default::default()
        },
        sql: SQL.into(),
        fingerprint: fingerprint_of(SQL).unwrap(),
        class: stepgate::classify::Class::Destructive,
        token_id: "0385576231f44ba6a92d50d234d69153".into(),
        signers: vec![Signer {
            fingerprint: "0B7F3C".into(),
            user_id: "Alice <alice@example.com>".into(),
            name: "alice".into(),
        }],
    });
    let mut g = c.benchmark_group("audit append");
    g.bench_function("without fsync", |b| {
        b.iter(|| log.write(&event, false).unwrap())
    });
    g.sample_size(20);
    g.bench_function("with fsync", |b| {
        b.iter(|| log.write(&event, true).unwrap())
    });
    g.finish();
}

criterion_group!(benches, verify, authorize, audit_append);
criterion_main!(benches);
