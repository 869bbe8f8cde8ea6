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
