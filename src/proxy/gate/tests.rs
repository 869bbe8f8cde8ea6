//! Unit tests of the session gate: no socket, no disk.

use super::expect::Expect;
use super::*;
use crate::config::Config;
use crate::gate::Registry;
use crate::wire::build::{self, message};

fn ctx() -> GateContext {
    GateContext::new(Config::default(), Registry::new(None), false)
}

fn st() -> SessionState {
    SessionState::new(SessionFields::default(), Rule::default(), Vec::new())
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    build::parse(name.as_bytes(), sql.as_bytes())
}

fn bind(portal: &str, stmt: &str) -> Vec<u8> {
    build::bind(portal.as_bytes(), stmt.as_bytes())
}

fn execute(portal: &str) -> Vec<u8> {
    build::execute(portal.as_bytes())
}

fn fe(s: &mut SessionState, c: &GateContext, m: &[u8]) -> Action {
    s.on_frontend(c, m[0], m)
}

fn be(s: &mut SessionState, tag: u8, body: &[u8]) -> Action {
    s.on_backend(&ctx(), tag, &message(tag, body))
}

#[test]
fn the_server_must_confirm_the_user() {
    // What a real server cannot be made to do through the startup packet (it reports the user it
    // logged in): a session_authorization that differs from the user stepgate read ends the login.
    let c = ctx();
    let fields = SessionFields {
        user: "app".into(),
        ..Default::default()
    };
    let mut s = SessionState::new(fields.clone(), Rule::default(), Vec::new());
    be(&mut s, b'S', b"session_authorization\0dba\0");
    let err = s.on_login(&c).unwrap_err();
    assert!(err.message.contains("logged in \"dba\""), "{}", err.message);
    let mut s = SessionState::new(fields, Rule::default(), Vec::new());
    be(&mut s, b'S', b"session_authorization\0app\0");
    assert!(s.on_login(&c).is_ok());
    // Later changes (SET SESSION AUTHORIZATION) are the session's own business.
    be(&mut s, b'S', b"session_authorization\0dba\0");
}

fn syncs(s: &SessionState) -> usize {
    s.queue.iter().filter(|e| matches!(e, Expect::Sync)).count()
}

#[test]
fn copy_end_outside_copy_keeps_every_sync() {
    // The server ignores CopyDone/CopyFail outside COPY and answers all three Syncs.
    let c = ctx();
    let mut s = st();
    for m in [
        build::sync(),
        build::sync(),
        message(b'c', b""),
        build::sync(),
        message(b'f', b"x\0"),
    ] {
        fe(&mut s, &c, &m);
    }
    assert_eq!(syncs(&s), 3);
    for _ in 0..3 {
        be(&mut s, b'Z', b"I");
    }
    // Only the last CopyFail's marker is left; it expects no answer and goes with the next message.
    assert!(s.queue.iter().all(|e| matches!(e, Expect::CopyEnd)));
    be(&mut s, b'Z', b"I");
    assert!(s.queue.is_empty());
}

#[test]
fn syncs_inside_copy_in_expect_no_answer() {
    // Parse/Bind/Execute(COPY FROM STDIN), Sync, CopyData, Sync, CopyDone, Sync: the server answers
    // 1, 2, G (copy-in: both Syncs ignored), C, Z.
    let c = ctx();
    for g_first in [false, true] {
        let mut s = st();
        for m in [parse("", "COPY t FROM STDIN"), bind("", ""), execute("")] {
            fe(&mut s, &c, &m);
        }
        be(&mut s, b'1', b"");
        be(&mut s, b'2', b"");
        if g_first {
            be(&mut s, b'G', b"\0\0\0");
        }
        for m in [
            build::sync(),
            message(b'd', b"1\n"),
            build::sync(),
            message(b'c', b""),
            build::sync(),
        ] {
            fe(&mut s, &c, &m);
        }
        if !g_first {
            be(&mut s, b'G', b"\0\0\0");
        }
        assert_eq!(syncs(&s), 1, "g_first {g_first}");
        be(&mut s, b'C', b"COPY 1\0");
        be(&mut s, b'Z', b"I");
        assert!(s.queue.is_empty(), "g_first {g_first}");
    }
}

#[test]
fn prepared_read_passes() {
    let c = ctx();
    let mut s = st();
    assert_eq!(
        fe(&mut s, &c, &parse("s0", "select $1::int + $2::int")),
        Action::Forward
    );
    assert_eq!(fe(&mut s, &c, &message(b'S', &[])), Action::Forward);
    be(&mut s, b'1', &[]);
    be(&mut s, b'Z', b"I");
    assert_eq!(fe(&mut s, &c, &bind("", "s0")), Action::Forward);
    assert_eq!(fe(&mut s, &c, &execute("")), Action::Forward);
}

#[test]
fn reparse_rejected_by_the_server_cannot_launder_a_drop() {
    let c = ctx();
    let mut s = st();
    fe(&mut s, &c, &parse("p", "DROP TABLE t"));
    fe(&mut s, &c, &message(b'S', &[]));
    be(&mut s, b'1', &[]);
    be(&mut s, b'Z', b"I");
    // Re-Parse under the same name: the server refuses with 42P05, after we have seen the Parse.
    fe(&mut s, &c, &parse("p", "SELECT 1"));
    fe(&mut s, &c, &message(b'S', &[]));
    fe(&mut s, &c, &bind("", "p"));
    assert!(
        matches!(fe(&mut s, &c, &execute("")), Action::Replace(_)),
        "pending re-Parse from an earlier batch counts at its most dangerous"
    );
    be(
        &mut s,
        b'E',
        b"SERROR\0C42P05\0Mprepared statement \"p\" already exists\0\0",
    );
    be(&mut s, b'Z', b"I");
    fe(&mut s, &c, &message(b'S', &[]));
    fe(&mut s, &c, &bind("", "p"));
    assert!(
        matches!(fe(&mut s, &c, &execute("")), Action::Replace(_)),
        "p is still the DROP"
    );
}

/// Untrusted bytes never panic the state machine: random messages of every inspected type, in both
/// directions, in any order.
#[test]
fn random_messages_never_panic() {
    use rand::{Rng, SeedableRng};
    let c = ctx();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let pieces: [&[u8]; 12] = [
        b"\0",
        b"p\0",
        b"SELECT 1\0",
        b"DROP TABLE t\0",
        b"SET stepgate.token = 'x'\0",
        b"\x00\x00\x03\xc4",
        b"S",
        b"P",
        b"\xff\xfe",
        b"EXECUTE p\0",
        b"PREPARE p AS DELETE FROM t\0",
        b"SERROR\0C26000\0\0",
    ];
    for _ in 0..2_000 {
        let mut s = st();
        for _ in 0..rng.random_range(1..12) {
            let mut body = Vec::new();
            for _ in 0..rng.random_range(0..4) {
                body.extend_from_slice(pieces[rng.random_range(0..pieces.len())]);
            }
            if rng.random_bool(0.5) {
                let tag = b"QPBECSFcf"[rng.random_range(0..9)];
                let _ = fe(&mut s, &c, &message(tag, &body));
            } else {
                let tag = b"123CIsEZS"[rng.random_range(0..9)];
                let _ = be(&mut s, tag, &body);
            }
        }
    }
}

#[test]
fn short_function_call_is_forwarded_for_the_server_to_reject() {
    let c = ctx();
    let mut s = st();
    assert_eq!(fe(&mut s, &c, &message(b'F', &[0, 1])), Action::Forward);
}

// ---- holds, tokens and names, driven message by message -------------------------------------------

/// The server's answer to a simple Query that ran one statement.
fn completes(s: &mut SessionState, c: &GateContext, tag: &str) {
    let mut body = tag.as_bytes().to_vec();
    body.push(0);
    s.on_backend(c, b'C', &message(b'C', &body));
    s.on_backend(c, b'Z', &message(b'Z', b"I"));
}

/// The server's answer to stepgate's refusal placeholder, and what the client gets instead.
fn refused(s: &mut SessionState, c: &GateContext) -> crate::wire::reply::ErrorReply {
    let server_error =
        crate::wire::reply::ErrorReply::error("42601", "syntax error at or near \"stepgate\"");
    let Action::Replace(to_client) = s.on_backend(c, b'E', &server_error.to_bytes()) else {
        panic!("the placeholder's error is not rewritten");
    };
    s.on_backend(c, b'Z', &message(b'Z', b"I"));
    let (code, message) = crate::wire::reply::error_fields(&to_client[5..]);
    crate::wire::reply::ErrorReply::error(Box::leak(code.into_boxed_str()), message)
}

fn query(s: &mut SessionState, c: &GateContext, sql: &str) -> Action {
    fe(s, c, &build::query(sql.as_bytes()))
}

fn app() -> SessionFields {
    SessionFields {
        user: "migrator".into(),
        database: "app".into(),
        ..Default::default()
    }
}

#[test]
fn a_guarded_statement_is_held_and_a_read_passes() {
    let c = ctx();
    let mut s = SessionState::new(app(), Rule::default(), Vec::new());
    assert_eq!(query(&mut s, &c, "SELECT 1"), Action::Forward);
    completes(&mut s, &c, "SELECT 1");
    let Action::Replace(sent) = query(&mut s, &c, "DROP TABLE t") else {
        panic!("a DROP was forwarded");
    };
    assert_eq!(
        sent,
        build::query(refusal::REFUSAL_SQL),
        "the server gets the placeholder only"
    );
    let err = refused(&mut s, &c);
    assert_eq!(err.code, "42501");
    assert!(
        err.message
            .starts_with("stepgate: statement held (destructive), held id "),
        "{}",
        err.message
    );
    let held = c.registry.list();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].sql, "DROP TABLE t");
    assert_eq!(held[0].session.database, "app");
    assert_eq!(s.expected_replies(), 0);
}

mod tokens {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use sequoia_openpgp::cert::prelude::*;

    use super::*;
    use crate::config::{Class, SignerPolicy};
    use crate::gate::ManualClock;
    use crate::token::payload::{fingerprint_of, Payload, StatementGrant};
    use crate::token::signed::{sign_cleartext, Keyring};
    use crate::token::Policy;

    struct Setup {
        ctx: GateContext,
        clock: Arc<ManualClock>,
        key: Cert,
    }

    fn setup() -> Setup {
        let start = SystemTime::now();
        let key = CertBuilder::general_purpose(Some("alice <alice@example.com>"))
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_creation_time(start - Duration::from_secs(3600))
            .generate()
            .unwrap()
            .0;
        let clock = Arc::new(ManualClock::new(start));
        let mut ctx = ctx();
        ctx.policy = Policy {
            keyring: Keyring {
                certs: vec![key.clone().strip_secret_key_material()],
            },
            signers: vec![SignerPolicy {
                name: "alice".into(),
                fingerprint: key.fingerprint().to_hex(),
                databases: vec!["*".into()],
                classes: Class::DEFAULT_GUARDED.to_vec(),
            }],
            instance: None,
        };
        ctx.clock = clock.clone();
        Setup { ctx, clock, key }
    }

    /// A token for database `app` listing `sqls`, valid for `ttl` from the injected clock's now.
    fn token(t: &Setup, sqls: &[&str], ttl: Duration) -> String {
        let now = t.clock.now();
        let payload = Payload {
            id: crate::token::new_uuid(),
            instance: None,
            database: "app".into(),
            user: None,
            not_before: None,
            not_after: now + ttl,
            statements: sqls
                .iter()
                .map(|sql| StatementGrant {
                    fingerprint: fingerprint_of(sql).unwrap(),
                    class: Class::Destructive,
                    sql: sql.to_string(),
                })
                .collect(),
            reason: None,
        };
        let signed = sign_cleartext(
            payload.render().as_bytes(),
            std::slice::from_ref(&t.key),
            now,
        )
        .unwrap();
        String::from_utf8(signed).unwrap()
    }

    fn set_token(s: &mut SessionState, t: &Setup, tok: &str) {
        let Action::Replace(sent) = query(s, &t.ctx, &format!("SET stepgate.token = '{tok}'"))
        else {
            panic!("the token itself would reach the server");
        };
        let sent = String::from_utf8_lossy(&sent).into_owned();
        assert!(
            sent.contains("SET stepgate.token = '") && !sent.contains("BEGIN PGP"),
            "{sent}"
        );
        completes(s, &t.ctx, "SET");
        assert!(s.token().is_some());
    }

    use crate::gate::Clock as _;

    #[test]
    fn a_token_runs_its_statement_once() {
        let t = setup();
        let mut s = SessionState::new(app(), Rule::default(), Vec::new());
        set_token(
            &mut s,
            &t,
            &token(&t, &["DROP TABLE t"], Duration::from_secs(600)),
        );
        assert_eq!(query(&mut s, &t.ctx, "DROP TABLE t"), Action::Forward);
        completes(&mut s, &t.ctx, "DROP TABLE");
        // The use is spent: the same statement is held again, and says why.
        assert!(matches!(
            query(&mut s, &t.ctx, "DROP TABLE t"),
            Action::Replace(_)
        ));
        let err = refused(&mut s, &t.ctx);
        assert_eq!(err.code, "42501");
        let held = t.ctx.registry.list();
        assert!(
            held.last().unwrap().reason.contains("already_used"),
            "{:?}",
            held
        );
        // A statement the token does not list is held too.
        assert!(matches!(
            query(&mut s, &t.ctx, "DROP TABLE u"),
            Action::Replace(_)
        ));
        refused(&mut s, &t.ctx);
        assert!(t
            .ctx
            .registry
            .list()
            .last()
            .unwrap()
            .reason
            .contains("statement_not_listed"));
    }

    #[test]
    fn a_token_expires_when_the_clock_says_so() {
        let t = setup();
        let mut s = SessionState::new(app(), Rule::default(), Vec::new());
        set_token(
            &mut s,
            &t,
            &token(
                &t,
                &["DROP TABLE t", "DROP TABLE u"],
                Duration::from_secs(60),
            ),
        );
        // Within its lifetime: authorized.
        t.clock.advance(Duration::from_secs(59));
        assert_eq!(query(&mut s, &t.ctx, "DROP TABLE u"), Action::Forward);
        completes(&mut s, &t.ctx, "DROP TABLE");
        // Past not-after: held with token_expired, no sleeping.
        t.clock.advance(Duration::from_secs(2));
        assert!(matches!(
            query(&mut s, &t.ctx, "DROP TABLE t"),
            Action::Replace(_)
        ));
        refused(&mut s, &t.ctx);
        let reason = t.ctx.registry.list().last().unwrap().reason.clone();
        assert!(reason.contains("token_expired"), "{reason}");
    }

    #[test]
    fn a_token_set_and_used_in_one_string_is_verified_first() {
        let t = setup();
        let mut s = SessionState::new(app(), Rule::default(), Vec::new());
        let tok = token(&t, &["DROP TABLE t"], Duration::from_secs(600));
        let Action::Replace(sent) = query(
            &mut s,
            &t.ctx,
            &format!("SET stepgate.token = '{tok}'; DROP TABLE t"),
        ) else {
            panic!("the token would reach the server");
        };
        let sent = String::from_utf8_lossy(&sent).into_owned();
        assert!(sent.ends_with("; DROP TABLE t\0"), "{sent}");
        // A token that does not verify fails the SET itself; nothing of the string runs.
        let mut s = SessionState::new(app(), Rule::default(), Vec::new());
        let forged = tok.replace("DROP TABLE t", "DROP TABLE x");
        assert!(
            matches!(query(&mut s, &t.ctx, &format!("SET stepgate.token = '{forged}'; DROP TABLE x")), Action::Replace(r) if r == build::query(refusal::REFUSAL_SQL))
        );
    }
}

#[test]
fn sql_prepared_names_follow_what_the_server_confirmed() {
    let c = ctx();
    let mut s = SessionState::new(app(), Rule::default(), Vec::new());
    // PREPARE of a DELETE without WHERE is session bookkeeping; EXECUTE runs the DELETE and is held.
    assert_eq!(
        query(&mut s, &c, "PREPARE p AS DELETE FROM t"),
        Action::Forward
    );
    completes(&mut s, &c, "PREPARE");
    assert!(matches!(query(&mut s, &c, "EXECUTE p"), Action::Replace(_)));
    assert!(refused(&mut s, &c)
        .message
        .starts_with("stepgate: statement held (destructive), held id "));
    // A read prepared under another name passes.
    assert_eq!(query(&mut s, &c, "PREPARE r AS SELECT 1"), Action::Forward);
    completes(&mut s, &c, "PREPARE");
    assert_eq!(query(&mut s, &c, "EXECUTE r"), Action::Forward);
    completes(&mut s, &c, "SELECT 1");
    // Once DEALLOCATE is confirmed the name is unknown: what it would run cannot be told, so it is held.
    assert_eq!(query(&mut s, &c, "DEALLOCATE r"), Action::Forward);
    completes(&mut s, &c, "DEALLOCATE");
    assert!(matches!(query(&mut s, &c, "EXECUTE r"), Action::Replace(_)));
    assert!(refused(&mut s, &c)
        .message
        .starts_with("stepgate: statement held (unparsed), held id "));
    // A protocol-level name: a Parse the server rejected never names anything.
    for m in [parse("q", "DROP TABLE t"), build::sync()] {
        fe(&mut s, &c, &m);
    }
    assert_eq!(s.expected_replies(), 2);
}
