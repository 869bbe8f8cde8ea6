//! The gate against a real PostgreSQL: guarded statements are held with the documented error, nothing
//! they contain runs, and client and server never disagree about the session afterwards.

mod common;

use common::raw::{self, Raw};
use common::*;
use stepgate::gate::Mode;

/// A fresh database with table `t (id int primary key, x int)` holding ids 1..=3, made directly on PostgreSQL.
async fn setup(db: &str) -> tokio_postgres::Client {
    pg().create_db(db).await;
    let c = pg().direct_to(db).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, x int); INSERT INTO t VALUES (1, 0), (2, 0), (3, 0)",
    )
    .await
    .unwrap();
    c
}

async fn ids(direct: &tokio_postgres::Client) -> Vec<i32> {
    direct
        .query("SELECT id FROM t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn table_exists(direct: &tokio_postgres::Client, name: &str) -> bool {
    direct
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .unwrap()
        .get(0)
}

fn held(e: &tokio_postgres::Error, class: &str) -> String {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e:?}"));
    assert_eq!(db.code().code(), "42501", "{db:?}");
    // An unparsed statement's message goes on with PostgreSQL's own error.
    let message = db.message();
    let detail = db.detail().unwrap();
    // The primary message names the held id (tools that print nothing else show it).
    let head = format!(
        "stepgate: statement held ({class}), held id {}",
        &detail[8..16]
    );
    assert!(
        message == head
            || class == "unparsed" && message.starts_with(&format!("{head}: "))
            || message.starts_with(&format!("{head}; not covered by token ")),
        "{message}"
    );
    assert!(detail.starts_with("held id "), "{detail}");
    let id = detail[8..16].to_string();
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{id}"
    );
    assert!(detail.contains("; fingerprint sha256:"), "{detail}");
    let hint = db.hint().unwrap();
    // It says where the held entry is (the server's config, or its state directory) and what comes next.
    assert!(
        hint.starts_with("stepgate token new --config ")
            || hint.starts_with("stepgate token new --state-dir "),
        "{hint}"
    );
    assert!(
        hint.contains(&format!(" --held {id} | gpg --clearsign")),
        "{hint}"
    );
    assert!(hint.contains("run the statement again"), "{hint}");
    assert!(hint.contains(&format!("SHOW HELD {id}")), "{hint}");
    id
}

#[tokio::test]
async fn drop_table_is_held_and_the_table_survives() {
    let direct = setup("gate_drop").await;
    let g = gate().await;
    let c = g.client("gate_drop").await;
    let e = c.simple_query("DROP TABLE t").await.unwrap_err();
    held(&e, "destructive");
    assert!(table_exists(&direct, "t").await);
    // Outside a transaction the session is idle and usable at once.
    assert_eq!(
        c.query_one("SELECT count(*)::int FROM t", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        3
    );
}

#[tokio::test]
async fn benign_statements_pass_and_dangerous_ones_do_not() {
    let direct = setup("gate_mix").await;
    let g = gate().await;
    let c = g.client("gate_mix").await;
    c.simple_query("SELECT * FROM t").await.unwrap();
    c.simple_query("INSERT INTO t VALUES (4, 0)").await.unwrap();
    c.simple_query("UPDATE t SET x = 1 WHERE id = 1")
        .await
        .unwrap();
    c.execute("UPDATE t SET x = $1 WHERE id = $2", &[&2i32, &2i32])
        .await
        .unwrap();
    for (sql, class) in [
        ("UPDATE t SET x = 1", "destructive"),
        ("UPDATE t SET x = 1 WHERE 1 = 1", "destructive"),
        ("WITH d AS (DELETE FROM t) SELECT 1", "destructive"),
        ("DELETE FROM t WHERE true", "destructive"),
        ("TRUNCATE t", "destructive"),
        ("CREATE TABLE u (a int)", "ddl"),
        ("GRANT SELECT ON t TO PUBLIC", "privileged"),
        (
            "SELECT pg_terminate_backend(pg_backend_pid())",
            "privileged",
        ),
        ("SELEC 1", "unparsed"),
    ] {
        let e = c.simple_query(sql).await.unwrap_err();
        held(&e, class);
    }
    // Through the extended protocol as well.
    let e = c.execute("DELETE FROM t", &[]).await.unwrap_err();
    held(&e, "destructive");
    let xs: Vec<(i32, i32)> = direct
        .query("SELECT id, x FROM t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(xs, [(1, 1), (2, 2), (3, 0), (4, 0)]);
    assert!(!table_exists(&direct, "u").await);
}

#[tokio::test]
async fn refusal_inside_a_transaction_aborts_it_on_both_sides() {
    let direct = setup("gate_tx").await;
    let g = gate().await;
    let c = g.client("gate_tx").await;
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("INSERT INTO t VALUES (10, 0)")
        .await
        .unwrap();
    let e = c.batch_execute("DROP TABLE t").await.unwrap_err();
    held(&e, "destructive");
    // PostgreSQL's own answer for an aborted transaction.
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"), "{e:?}");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        ids(&direct).await,
        [1, 2, 3],
        "the insert before the refusal was rolled back"
    );
    assert!(table_exists(&direct, "t").await);
    c.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn refusal_in_a_multi_statement_query_runs_nothing() {
    let direct = setup("gate_multi").await;
    let g = gate().await;
    let c = g.client("gate_multi").await;
    let e = c
        .simple_query("INSERT INTO t VALUES (20, 0); SELECT 1; DROP TABLE t;")
        .await
        .unwrap_err();
    held(&e, "destructive");
    assert_eq!(ids(&direct).await, [1, 2, 3]);
    assert!(table_exists(&direct, "t").await);
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

use stepgate::wire::build::{self, sync};

#[tokio::test]
async fn refusal_in_a_pipelined_batch_behaves_like_a_server_error() {
    let direct = setup("gate_batch").await;
    let g = gate().await;
    let mut r = Raw::login(g.addr, &pg().user, "gate_batch", &[]).await;
    let mut batch = Vec::new();
    for sql in [
        "INSERT INTO t VALUES (30, 0)",
        "DROP TABLE t",
        "INSERT INTO t VALUES (31, 0)",
    ] {
        batch.extend(parse("", sql));
        batch.extend(bind("", ""));
        batch.extend(execute(""));
    }
    batch.extend(sync());
    r.send(&batch).await;
    let msgs = r.until_ready().await;
    let tags: String = msgs.iter().map(|(t, _)| *t as char).collect();
    // INSERT: ParseComplete, BindComplete, CommandComplete; DROP: ParseComplete, BindComplete, our error;
    // then nothing until ReadyForQuery (idle: the implicit transaction was rolled back).
    assert_eq!(tags, "12C12EZ", "{msgs:?}");
    assert_eq!(raw::field(&msgs[5].1, b'C').as_deref(), Some("42501"));
    assert_eq!(msgs[6].1, b"I");
    assert_eq!(
        ids(&direct).await,
        [1, 2, 3],
        "the first INSERT was not committed"
    );
    // The session is usable after Sync.
    r.send(&[parse("", "SELECT 1"), bind("", ""), execute(""), sync()].concat())
        .await;
    let msgs = r.until_ready().await;
    let tags: String = msgs.iter().map(|(t, _)| *t as char).collect();
    assert_eq!(tags, "12DCZ");
}

/// Re-Parsing an existing name with `SELECT 1` fails on the server (42P05); it must not turn the DROP
/// stored under that name into something that passes.
#[tokio::test]
async fn a_rejected_reparse_cannot_launder_a_prepared_drop() {
    let direct = setup("gate_reparse").await;
    let g = gate().await;
    let mut r = Raw::login(g.addr, &pg().user, "gate_reparse", &[]).await;
    r.send(&[parse("p", "DROP TABLE t"), sync()].concat()).await;
    let tags: String = r
        .until_ready()
        .await
        .iter()
        .map(|(t, _)| *t as char)
        .collect();
    assert_eq!(tags, "1Z", "Parse of a DROP runs nothing and passes");
    r.send(&[parse("p", "SELECT 1"), sync()].concat()).await;
    let msgs = r.until_ready().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42P05"));
    r.send(&[bind("", "p"), execute(""), sync()].concat()).await;
    let msgs = r.until_ready().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42501"), "{msgs:?}");
    assert!(
        Raw::error_message(&msgs)
            .unwrap_or_default()
            .starts_with("stepgate: statement held (destructive), held id "),
        "{msgs:?}"
    );
    assert!(table_exists(&direct, "t").await);
    // Also when everything is sent at once, without waiting for the 42P05.
    r.send(
        &[
            parse("p", "SELECT 1"),
            sync(),
            bind("", "p"),
            execute(""),
            sync(),
        ]
        .concat(),
    )
    .await;
    let first = r.until_ready().await;
    assert_eq!(Raw::error_code(&first).as_deref(), Some("42P05"));
    let second = r.until_ready().await;
    assert_eq!(
        Raw::error_code(&second).as_deref(),
        Some("42501"),
        "{second:?}"
    );
    assert!(table_exists(&direct, "t").await);
}

#[tokio::test]
async fn sql_prepare_passes_and_every_execution_is_judged() {
    let direct = setup("gate_prepare").await;
    let g = gate().await;
    let c = g.client("gate_prepare").await;
    c.batch_execute("PREPARE wipe AS DELETE FROM t")
        .await
        .unwrap();
    c.batch_execute("PREPARE one (int) AS SELECT $1")
        .await
        .unwrap();
    c.simple_query("EXECUTE one(1)").await.unwrap();
    for sql in [
        "EXECUTE wipe",
        "EXPLAIN ANALYZE EXECUTE wipe",
        "CREATE TABLE copy AS EXECUTE wipe",
        "EXECUTE never_prepared",
    ] {
        let e = c.simple_query(sql).await.unwrap_err();
        // CREATE TABLE … AS EXECUTE takes the class of the DELETE it would run.
        let class = if sql.contains("never") {
            "unparsed"
        } else {
            "destructive"
        };
        held(&e, class);
    }
    assert_eq!(ids(&direct).await, [1, 2, 3]);
    // After DEALLOCATE the name is unknown again.
    c.batch_execute("DEALLOCATE one").await.unwrap();
    let e = c.simple_query("EXECUTE one(1)").await.unwrap_err();
    held(&e, "unparsed");
    // Within one query string, PREPARE then EXECUTE: the EXECUTE is judged by what was just prepared.
    let e = c
        .simple_query("PREPARE w2 AS DELETE FROM t; EXECUTE w2")
        .await
        .unwrap_err();
    held(&e, "destructive");
    assert_eq!(ids(&direct).await, [1, 2, 3]);
    // PostgreSQL cannot prepare a TRUNCATE: the whole string is unparsed, whatever its first word says.
    let e = c
        .simple_query("PREPARE w3 AS TRUNCATE t; EXECUTE w3")
        .await
        .unwrap_err();
    held(&e, "unparsed");
}

#[tokio::test]
async fn function_call_fast_path_is_privileged_except_large_objects() {
    let g = gate().await;
    let mut r = Raw::login(g.addr, &pg().user, "postgres", &[]).await;
    let call = |oid: u32, args: &[i32]| {
        let mut b = oid.to_be_bytes().to_vec();
        b.extend(1u16.to_be_bytes());
        b.extend(1u16.to_be_bytes());
        b.extend((args.len() as u16).to_be_bytes());
        for a in args {
            b.extend(4i32.to_be_bytes());
            b.extend(a.to_be_bytes());
        }
        b.extend(1u16.to_be_bytes());
        raw::msg(b'F', &b)
    };
    // lo_creat (957) passes: large objects through libpq's fast path keep working.
    r.send(&call(957, &[-1])).await;
    let msgs = r.until_ready().await;
    let v = msgs
        .iter()
        .find(|(t, _)| *t == b'V')
        .expect("lo_creat answered");
    let oid = i32::from_be_bytes([v.1[4], v.1[5], v.1[6], v.1[7]]);
    // lo_unlink (964) is held.
    r.send(&call(964, &[oid])).await;
    let msgs = r.until_ready().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42501"), "{msgs:?}");
    assert!(
        Raw::error_message(&msgs)
            .unwrap_or_default()
            .starts_with("stepgate: statement held (privileged), held id "),
        "{msgs:?}"
    );
    // The large object still exists.
    r.send(&raw::query(
        format!("SELECT count(*) FROM pg_largeobject_metadata WHERE oid = {oid}").as_bytes(),
    ))
    .await;
    let msgs = r.until_ready().await;
    assert!(
        msgs.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"1")),
        "{msgs:?}"
    );
    // Any other function over the fast path is privileged (int4pl, OID 177).
    r.send(&call(177, &[1, 2])).await;
    assert_eq!(
        Raw::error_code(&r.until_ready().await).as_deref(),
        Some("42501")
    );
}

/// A valid token for database `postgres` (it lists one harmless statement).
fn a_token() -> String {
    use common::tokens::{payload, sign};
    sign(
        &payload("postgres", &["DROP TABLE IF EXISTS no_such_table"]),
        &["alice"],
    )
}

fn first_value(rows: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

#[tokio::test]
async fn stepgate_settings_stay_away_from_the_server() {
    let g = gate_with(common::tokens::policy).await;
    let c = g.client("postgres").await;
    let tok = a_token();
    c.batch_execute(&common::tokens::set_token(&tok))
        .await
        .unwrap();
    // The server holds the token's id, never the token.
    let shown = first_value(&c.simple_query("SHOW stepgate.token").await.unwrap()).unwrap();
    assert_eq!(shown.len(), 36, "{shown}");
    assert!(tok.contains(&shown), "{shown}");
    let status = first_value(&c.simple_query("SHOW stepgate.status").await.unwrap()).unwrap();
    assert!(status.contains("mode=enforce"), "{status}");
    assert!(status.contains("settings=stepgate.token"), "{status}");
    assert!(!status.contains("BEGIN PGP"), "{status}");
    c.batch_execute("RESET stepgate.token").await.unwrap();
    let status = c.simple_query("SHOW stepgate.status").await.unwrap();
    assert!(format!("{status:?}").contains("settings=-"));
    // In a multi-statement string it takes effect for the statements after it.
    let rows = c
        .simple_query(&format!(
            "{}; SHOW stepgate.status",
            common::tokens::set_token(&tok)
        ))
        .await
        .unwrap();
    assert!(format!("{rows:?}").contains("settings=stepgate.token"));
    c.batch_execute("RESET stepgate.token").await.unwrap();
    // Inside an aborted transaction: 25P02 like any statement, and nothing changes.
    c.batch_execute("BEGIN").await.unwrap();
    let _ = c.batch_execute("SELECT 1/0").await.unwrap_err();
    let e = c
        .batch_execute(&common::tokens::set_token(&tok))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"));
    c.batch_execute("ROLLBACK").await.unwrap();
    let rows = c.simple_query("SHOW stepgate.status").await.unwrap();
    assert!(format!("{rows:?}").contains("token=none"), "{rows:?}");
    // DISCARD ALL and RESET ALL clear them.
    c.batch_execute(&common::tokens::set_token(&tok))
        .await
        .unwrap();
    c.batch_execute("DISCARD ALL").await.unwrap();
    let rows = c.simple_query("SHOW stepgate.status").await.unwrap();
    assert!(format!("{rows:?}").contains("settings=-"), "{rows:?}");
    // A stepgate setting stepgate does not know (a typo) is refused, naming the known ones, and never sent.
    for sql in ["SET stepgate.tokn = 'x'", "SET stepgate.note TO 'c2VjcmV0'"] {
        let e = c.batch_execute(sql).await.unwrap_err();
        let db = e.as_db_error().unwrap();
        assert_eq!(db.code().code(), "42704", "{db:?}");
        assert!(
            db.message().contains("unrecognized stepgate setting"),
            "{db:?}"
        );
        assert!(
            db.hint().unwrap_or_default().contains("stepgate.token"),
            "{db:?}"
        );
    }
    let e = c.execute("SET stepgate.tokn = 'x'", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42704"));
    let rows = c.simple_query("SHOW stepgate.status").await.unwrap();
    assert!(format!("{rows:?}").contains("settings=-"), "{rows:?}");
}

/// The server's own statement log never sees a stepgate setting's value.
#[tokio::test]
async fn the_server_log_never_sees_the_value() {
    let Some(log) = pg().devdb().map(|d| d.log_path()) else {
        return; // DATABASE_URL: the server's log is not ours to read
    };
    let g = gate_with(common::tokens::policy).await;
    let c = g.client("postgres").await;
    c.batch_execute("SET log_statement = 'all'").await.unwrap();
    let tok = a_token();
    c.batch_execute(&format!(
        "{}; SELECT 'marker-after-set'",
        common::tokens::set_token(&tok)
    ))
    .await
    .unwrap();
    c.execute(&common::tokens::set_token(&tok), &[])
        .await
        .unwrap();
    // A refused spelling never reaches the server either.
    let _ = c
        .batch_execute("SET stepgate.tokn = 'c2VjcmV0LWluLXRoZS1sb2c'")
        .await
        .unwrap_err();
    c.batch_execute("SELECT 'marker-end'").await.unwrap();
    let mut text = String::new();
    for _ in 0..50 {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("marker-end") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(text.contains("marker-after-set"), "the statement log is on");
    assert!(
        text.contains("SET stepgate.token = '"),
        "the placeholder (the token's id) reached the server"
    );
    assert!(
        !text.contains("BEGIN PGP SIGNED MESSAGE"),
        "a token reached the server log"
    );
    assert!(
        !text.contains("c2VjcmV0LWluLXRoZS1sb2c"),
        "a value reached the server log"
    );
}

#[tokio::test]
async fn stepgate_settings_through_the_extended_protocol() {
    let g = gate_with(common::tokens::policy).await;
    let c = g.client("postgres").await;
    // tokio-postgres sends Parse/Bind/Execute: the Parse is rewritten, the token kept by stepgate.
    let tok = a_token();
    c.execute(&common::tokens::set_token(&tok), &[])
        .await
        .unwrap();
    let row = c.query_one("SHOW stepgate.status", &[]).await.unwrap();
    let status: String = row.get(0);
    assert!(status.contains("settings=stepgate.token"), "{status}");
    assert!(!status.contains("BEGIN PGP"));
    let row = c.query_one("SHOW stepgate.token", &[]).await.unwrap();
    let shown: String = row.get(0);
    assert!(
        shown.len() == 36 && tok.contains(&shown),
        "the server only ever saw the token's id: {shown}"
    );
    c.execute("RESET stepgate.token", &[]).await.unwrap();
    let status: String = c
        .query_one("SHOW stepgate.status", &[])
        .await
        .unwrap()
        .get(0);
    assert!(status.contains("settings=-"), "{status}");
}

#[tokio::test]
async fn other_spellings_of_stepgate_settings_are_refused_and_never_forwarded() {
    for options in relays() {
        let g = gate_with_options(|_| {}, options).await;
        let c = g.client("postgres").await;
        for sql in [
            "SET \"stepgate\".token = 'x'",
            "SET StepGate.token = 'x'",
            "SET SESSION stepgate.token = 'x'",
            "SET LOCAL stepgate.token = 'x'",
            "SELECT set_config('stepgate.token', 'x', false)",
            "SELECT set_config(E'stepgate\\x2etoken', 'x', false)",
            "ALTER ROLE postgres SET stepgate.token = 'x'",
            "ALTER DATABASE postgres SET stepgate.token = 'x'",
            "SET stepgate.token = 'a', 'b'",
            // Spellings only PostgreSQL's own decoding reveals (issue 15).
            "SET U&\"st\\0065pgate\".token = 'x'",
            "SET U&\"st!0065pgate\" UESCAPE '!' .token = 'x'",
            "SELECT set_config(E'\\x73tepgate.token', 'x', false)",
            "SELECT set_config(U&'st!0065pgate.token' UESCAPE '!', 'x', false)",
            "SELECT set_config(U&'st\\0065pgate.token', 'x', false)",
            "SELECT current_setting(E'\\x73tepgate.token', true)",
            "RESET U&\"st\\0065pgate\".token",
            "SHOW U&\"st!0065pgate\" UESCAPE '!' .token",
        ] {
            let e = c.simple_query(sql).await.unwrap_err();
            let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e:?}"));
            assert_eq!(db.code().code(), "42501", "{sql}");
            // A U&'…' literal with a backslash reads two ways (an error with standard_conforming_strings
            // off): held as unparsed, which forwards nothing either.
            assert!(
                db.message().contains("names a stepgate setting")
                    || db
                        .message()
                        .starts_with("stepgate: statement held (unparsed)"),
                "{sql}: {}",
                db.message()
            );
        }
        // Each refusal is in the audit log as `refused`, with the start of the statement only.
        let refused: Vec<_> = g
            .audit()
            .into_iter()
            .filter(|r| r["event"] == "refused")
            .collect();
        assert!(refused.len() >= 10, "{refused:?}");
        assert!(refused
            .iter()
            .any(|r| r["sql"] == "ALTER ROLE postgres SET stepgate.token = '********'"));
        // Nothing reached the server: the placeholder does not exist, no role or database setting was stored.
        let e = c.simple_query("SHOW stepgate.token").await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42704"));
        let direct = pg().direct().await;
        let n: i64 = direct
        .query_one("SELECT count(*) FROM pg_db_role_setting WHERE array_to_string(setconfig, ',') LIKE '%stepgate%'", &[])
        .await
        .unwrap()
        .get(0);
        assert_eq!(n, 0);
        // Through the extended protocol too.
        let e = c
            .query("SELECT set_config('stepgate.token', $1, false)", &[&"x"])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
        // And the decoded spellings through the extended protocol.
        for sql in [
            "SELECT set_config(E'\\x73tepgate.token', $1, false)",
            "SELECT set_config(U&'st!0065pgate.token' UESCAPE '!', $1, false)",
        ] {
            let e = c.query(sql, &[&"x"]).await.unwrap_err();
            assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}");
        }
    }
}

#[tokio::test]
async fn held_entries_are_recorded_with_passwords_redacted() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_path_buf();
    let g = gate_with(|c| c.state_dir = dir.clone()).await;
    let c = g.client("postgres").await;
    let e = c
        .simple_query("CREATE ROLE sneaky LOGIN PASSWORD 'hunter2-secret'")
        .await
        .unwrap_err();
    let id = held(&e, "privileged");
    let log = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert!(
        !log.contains("hunter2-secret"),
        "password in the audit log: {log}"
    );
    let rec: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["held_id"] == id.as_str())
        .expect("held record");
    assert_eq!(rec["event"], "held");
    assert_eq!(rec["class"], "privileged");
    assert_eq!(rec["user"], pg().user.as_str());
    assert_eq!(rec["database"], "postgres");
    assert_eq!(rec["client_addr"], "127.0.0.1");
    assert!(rec["sql"].as_str().unwrap().contains("PASSWORD '********'"));
    assert!(rec["fingerprint"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(rec["seq"].as_u64(), Some(1));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(dir.join("audit.jsonl"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}

#[tokio::test]
async fn observe_mode_lets_guarded_statements_run_and_records_them() {
    let direct = setup("gate_observe").await;
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_path_buf();
    let g = gate_with(|c| {
        c.mode = Mode::Observe;
        c.state_dir = dir.clone();
    })
    .await;
    let c = g.client("gate_observe").await;
    c.batch_execute("DELETE FROM t WHERE id = 3").await.unwrap();
    c.batch_execute("UPDATE t SET x = 9").await.unwrap();
    let xs: Vec<i32> = direct
        .query("SELECT x FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(xs, [9, 9]);
    let log = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let observed: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "observed")
        .collect();
    assert_eq!(observed.len(), 1, "{log}");
    assert_eq!(observed[0]["class"], "destructive");
}

#[tokio::test]
async fn unparsed_stays_guarded_unless_allowed() {
    let g = gate_with(|c| {
        c.rules = vec![stepgate::config::Rule {
            database: "*".into(),
            user: "*".into(),
            guard: vec![],
            ..Default::default()
        }]
    })
    .await;
    let c = g.client("postgres").await;
    c.simple_query("CREATE TEMP TABLE scratch (a int)")
        .await
        .unwrap();
    let e = c.simple_query("SELEC 1").await.unwrap_err();
    held(&e, "unparsed");
    let g = gate_with(pipe_only).await;
    let c = g.client("postgres").await;
    let e = c.simple_query("SELEC 1").await.unwrap_err();
    assert_eq!(
        sqlstate(&e).as_deref(),
        Some("42601"),
        "the server's own syntax error"
    );
}

/// pg_dump through stepgate: it takes `LOCK TABLE … IN ACCESS SHARE MODE` on every table (the lock a SELECT
/// takes, so `read`), and the dump comes out whole. A stronger lock mode is still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_dump_works_through_stepgate() {
    let db = "gate_pg_dump";
    pg().create_db(db).await;
    let direct = pg().direct_to(db).await;
    direct
        .batch_execute(
            "CREATE TABLE dumped (id int PRIMARY KEY, note text); INSERT INTO dumped VALUES (1, 'one');
             CREATE TABLE other (a int)",
        )
        .await
        .unwrap();
    let g = gate().await;
    let mut cmd = std::process::Command::new("pg_dump");
    cmd.args(["-h", "127.0.0.1", "-p", &g.addr.port().to_string()])
        .args(["-U", &pg().user, "-d", db])
        .env_remove("PGOPTIONS");
    if let Some(p) = &pg().password {
        cmd.env("PGPASSWORD", p);
    }
    let out = cmd.output().expect("pg_dump runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(dump.contains("CREATE TABLE public.dumped"), "{dump}");
    assert!(dump.contains("CREATE TABLE public.other"), "{dump}");
    assert!(dump.contains("1\tone"), "{dump}");

    let c = g.client(db).await;
    c.batch_execute("BEGIN; LOCK TABLE dumped IN ACCESS SHARE MODE; COMMIT")
        .await
        .unwrap();
    let e = c
        .batch_execute("BEGIN; LOCK TABLE dumped IN SHARE MODE; COMMIT")
        .await
        .unwrap_err();
    held(&e, "privileged");
}

/// Issue 18: `[[allow]]` entries (in the config or an `include`d file) let a tool's exact bookkeeping
/// statements pass without a token, recorded as `allowed`; anything else — another statement, another
/// database than the entry names — is held as before.
#[tokio::test]
async fn allow_entries_pass_exact_statements_without_a_token() {
    let db = "gate_allow";
    let direct = setup(db).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tool.toml"),
        "[[allow]]\nname = \"tool lock\"\nsql = \"UPDATE t SET x = 1\"\n",
    )
    .unwrap();
    let config = dir.path().join("stepgate.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"state\"\ninclude = [\"tool.toml\"]\n\
             [[allow]]\nname = \"bookkeeping\"\nsql = \"CREATE TABLE IF NOT EXISTS schema_migrations (version text PRIMARY KEY)\"\ndatabases = [\"{db}\"]\n\
             [[allow]]\nsql = \"DROP TABLE t\"\ndatabases = [\"elsewhere\"]\n"
        ),
    )
    .unwrap();
    let g = gate_from_file(&config).await;
    let c = g.client(db).await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS schema_migrations (version text PRIMARY KEY)")
        .await
        .unwrap();
    // Layout and comments aside, it is the same statement.
    c.batch_execute(
        "create table if not exists schema_migrations (version text primary key) -- again",
    )
    .await
    .unwrap();
    c.batch_execute("UPDATE t SET x = 1").await.unwrap();
    assert_eq!(
        direct
            .query_one("SELECT count(*) FROM t WHERE x = 1", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        3
    );
    // The extended protocol too.
    c.execute("UPDATE t SET x = 1", &[]).await.unwrap();
    held(
        &c.batch_execute("UPDATE t SET x = 2").await.unwrap_err(),
        "destructive",
    );
    // An allowed statement does not carry a guarded one beside it, in either order; a prepared statement's
    // EXECUTE is judged as any other (PREPARE itself runs nothing).
    for sql in [
        "UPDATE t SET x = 1; DROP TABLE t",
        "DROP TABLE t; UPDATE t SET x = 1",
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}: {e:?}");
    }
    assert!(table_exists(&direct, "t").await);
    c.batch_execute("PREPARE p AS UPDATE t SET x = 5")
        .await
        .unwrap();
    held(
        &c.batch_execute("EXECUTE p").await.unwrap_err(),
        "destructive",
    );
    assert_eq!(
        direct
            .query_one("SELECT count(*) FROM t WHERE x = 5", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    held(
        &c.batch_execute("DROP TABLE t").await.unwrap_err(),
        "destructive",
    );
    held(
        &c.batch_execute("CREATE TABLE IF NOT EXISTS other (version text PRIMARY KEY)")
            .await
            .unwrap_err(),
        "ddl",
    );
    let records = g.audit();
    let allowed: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "allowed")
        .map(|r| r["sql"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(allowed.len(), 4, "{allowed:?}");

    // An entry with both sql and fingerprint stops the config from loading, naming the problem.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[allow]]\nsql = \"UPDATE t SET x = 1\"\nfingerprint = \"sha256:00\"\n",
    )
    .unwrap();
    let err = stepgate::config::Config::load(Some(&bad), &Default::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("exactly one of sql or fingerprint"),
        "{err}"
    );
}
