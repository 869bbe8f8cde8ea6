//! The audit log as evidence: `stepgate audit verify` after a real walkthrough and after one changed byte,
//! a crash right after an authorization, an unwritable log, transaction outcomes, and the state lock.

mod common;

use std::process::Command;
use std::time::Duration;

use common::serve::{Serve, BIN};
use common::tokens::*;
use common::*;

fn verify_cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test]
async fn audit_verify_passes_after_the_walkthrough_and_names_any_changed_byte() {
    let direct = setup("aud_verify").await;
    let g = gate_with(policy).await;
    let c = g.client("aud_verify").await;
    held(&c.batch_execute("DROP TABLE t").await.unwrap_err());
    let tok = sign(&payload("aud_verify", &["DROP TABLE t"]), &["alice"]);
    c.batch_execute(&set_token(&tok)).await.unwrap();
    c.batch_execute("DROP TABLE t").await.unwrap();
    assert!(!exists(&direct, "t").await);
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let keyring = keys_dir().join("keyring");
    let state = g.state_dir().to_path_buf();
    let (code, out) = verify_cli(&[
        "--keyring",
        keyring.to_str().unwrap(),
        state.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: "), "{out}");
    assert!(
        out.contains("1 authorizations, signers: alice; head "),
        "{out}"
    );
    let head = out.trim().rsplit("head ").next().unwrap().to_string();
    let (code, json) = verify_cli(&[
        "--format",
        "json",
        "--expect-head",
        &head,
        state.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{json}");
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["head"], head.as_str());

    // One changed byte in any record is found at that record (the last one through the recorded head).
    let log = state.join("audit.jsonl");
    let original = std::fs::read(&log).unwrap();
    let starts: Vec<usize> = std::iter::once(0)
        .chain(
            original
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .filter(|&i| i < original.len())
        .collect();
    assert!(starts.len() >= 5, "{}", String::from_utf8_lossy(&original));
    for (k, &start) in starts.iter().enumerate() {
        let mut bytes = original.clone();
        // A byte inside the `time` value: the record still parses, only its content changed.
        let at = start
            + String::from_utf8_lossy(&original[start..])
                .find("\"time\":\"")
                .unwrap()
            + 10;
        bytes[at] = if bytes[at] == b'9' { b'8' } else { b'9' };
        std::fs::write(&log, &bytes).unwrap();
        let (code, out) = verify_cli(&["--expect-head", &head, log.to_str().unwrap()]);
        assert_eq!(code, 1, "record {}: {out}", k + 1);
        assert!(
            out.starts_with(&format!("BROKEN at record {} (", k + 1)),
            "record {}: {out}",
            k + 1
        );
    }
    std::fs::write(&log, &original).unwrap();
}

#[tokio::test]
async fn sigkill_right_after_an_authorization_keeps_the_use_spent() {
    let direct = setup("aud_kill").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stepgate.toml");
    let start = |port: u16| {
        serve_config(dir.path(), port);
        Serve::spawn(
            vec![
                "serve".into(),
                "--config".into(),
                config.display().to_string(),
            ],
            port,
            tempfile::tempdir().unwrap(),
            &[],
        )
    };
    let mut serve = start(stepgate::devdb::free_port());
    let conn = |port: u16| {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(port)
            .user(&pg().user)
            .dbname("aud_kill");
        if let Some(p) = &pg().password {
            cfg.password(p);
        }
        cfg
    };
    let c = connect(conn(serve.port)).await.unwrap();
    let tok = sign(&payload("aud_kill", &["DROP TABLE t"]), &["alice"]);
    c.batch_execute(&set_token(&tok)).await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("DROP TABLE t").await.unwrap();
    // Killed before the transaction commits: the server rolls it back when the connection drops.
    serve.child.kill().unwrap();
    serve.child.wait().unwrap();
    let records = stepgate::audit::AuditLog::read_dir(&dir.path().join("state")).unwrap();
    let auth: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "authorized")
        .collect();
    assert_eq!(auth.len(), 1, "the authorization is on disk");
    assert_eq!(auth[0]["sql"], "DROP TABLE t");
    drop(c);
    for _ in 0..50 {
        if exists(&direct, "t").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        exists(&direct, "t").await,
        "the uncommitted DROP was rolled back"
    );

    let port = stepgate::devdb::free_port();
    serve = start(port);
    let c = connect(conn(port)).await.unwrap();
    c.batch_execute(&set_token(&tok)).await.unwrap();
    let (_, detail) = held(&c.batch_execute("DROP TABLE t").await.unwrap_err());
    assert!(detail.contains("already_used"), "{detail}");
    assert!(exists(&direct, "t").await);
    // A second instance on the same state directory refuses to start.
    let out = Command::new(BIN)
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another stepgate"), "{err}");
    drop(serve);
}

#[tokio::test]
async fn an_unwritable_audit_log_refuses_guarded_statements_only() {
    let direct = setup("aud_full").await;
    let g = gate_with(|c| {
        policy(c);
        std::fs::create_dir_all(&c.state_dir).unwrap();
        std::os::unix::fs::symlink("/dev/full", c.state_dir.join("audit.jsonl")).unwrap();
        c.metrics_listen = Some("127.0.0.1:0".into());
    })
    .await;
    let c = g.client("aud_full").await;
    let n = count(&c, "t").await;
    assert_eq!(n, 3);
    c.batch_execute("INSERT INTO t VALUES (4)").await.unwrap();
    for sql in ["DROP TABLE t", "TRUNCATE t"] {
        let e = c.batch_execute(sql).await.unwrap_err();
        let db = e.as_db_error().unwrap();
        assert_eq!(db.code().code(), "58030", "{db:?}");
        assert_eq!(
            db.message(),
            "stepgate: audit log unavailable; guarded statement refused"
        );
    }
    // Even a valid token: its `token_set` record cannot be written, so the token is refused (it used to
    // answer SET), and the statement it lists is refused as before.
    let tok = sign(&payload("aud_full", &["DROP TABLE t"]), &["alice"]);
    let e = c.batch_execute(&set_token(&tok)).await.unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "58030", "{db:?}");
    let e = c.batch_execute("DROP TABLE t").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("58030"));
    assert!(exists(&direct, "t").await);
    let n = count(&c, "t").await;
    assert_eq!(n, 4);
    // The metrics say the log cannot be written.
    let text = scrape(g.metrics_addr.unwrap()).await;
    assert_eq!(value(&text, "stepgate_audit_unavailable"), 1, "{text}");
}

#[tokio::test]
async fn the_outcome_of_the_transaction_is_recorded() {
    let direct = setup("aud_outcome").await;
    let g = gate_with(policy).await;
    let c = g.client("aud_outcome").await;
    let tok = sign(
        &payload("aud_outcome", &["DROP TABLE t2", "DROP TABLE t3"]),
        &["alice"],
    );
    c.batch_execute(&set_token(&tok)).await.unwrap();
    c.batch_execute("BEGIN; DROP TABLE t2").await.unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
    c.batch_execute("DROP TABLE t3").await.unwrap();
    assert!(exists(&direct, "t2").await);
    assert!(!exists(&direct, "t3").await);
    let audit = g.audit();
    let outcome = |sql: &str| {
        audit
            .iter()
            .filter(|r| r["sql"] == sql)
            .filter_map(|r| r["event"].as_str())
            .collect::<Vec<_>>()
    };
    // Rolled back by the server, so its use is given back (issue 18).
    assert_eq!(
        outcome("DROP TABLE t2"),
        ["authorized", "executed", "rolled_back", "released"]
    );
    assert_eq!(
        outcome("DROP TABLE t3"),
        ["authorized", "executed", "committed"]
    );
}

/// `GET /metrics` as curl would send it.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

fn value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test]
async fn metrics_count_what_happens() {
    let _direct = setup("aud_metrics").await;
    let g = gate_with(|c| {
        policy(c);
        c.metrics_listen = Some("127.0.0.1:0".into());
    })
    .await;
    let addr = g.metrics_addr.unwrap();
    let before = scrape(addr).await;
    assert_eq!(value(&before, "stepgate_sessions_open"), 0);
    let c = g.client("aud_metrics").await;
    c.batch_execute("SELECT 1").await.unwrap();
    held(&c.batch_execute("DROP TABLE t").await.unwrap_err());
    let _ = c.batch_execute(&set_token("garbage")).await.unwrap_err();
    let tok = sign(&payload("aud_metrics", &["DROP TABLE t"]), &["alice"]);
    c.batch_execute(&set_token(&tok)).await.unwrap();
    c.batch_execute("DROP TABLE t").await.unwrap();
    let after = scrape(addr).await;
    assert_eq!(value(&after, "stepgate_sessions_open"), 1);
    assert_eq!(value(&after, "stepgate_sessions_total"), 1);
    assert_eq!(
        value(
            &after,
            "stepgate_statements_total{class=\"read\",decision=\"pass\"}"
        ),
        1
    );
    assert_eq!(value(&after, "stepgate_held_total"), 2);
    assert_eq!(value(&after, "stepgate_authorized_total"), 1);
    assert_eq!(
        value(
            &after,
            "stepgate_token_rejections_total{reason=\"malformed\"}"
        ),
        1
    );
    assert!(value(&after, "stepgate_classify_seconds_count") >= 3);
    assert_eq!(value(&after, "stepgate_audit_unavailable"), 0);
    let head = stepgate::audit::AuditLog::read_dir(g.state_dir())
        .unwrap()
        .len() as u64;
    assert!(
        after.contains(&format!("\"}} {head}")),
        "the audit head is shown: {after}"
    );
    assert!(
        after.contains("stepgate_audit_head{hash=\"sha256:"),
        "{after}"
    );
}

#[tokio::test]
async fn a_state_directory_removed_under_a_running_gate_refuses_guarded_statements() {
    let direct = setup("aud_gone").await;
    let g = gate_with(policy).await;
    let c = g.client("aud_gone").await;
    held(&c.batch_execute("DROP TABLE t").await.unwrap_err());
    std::fs::remove_dir_all(g.state_dir()).unwrap();
    let e = c.batch_execute("DROP TABLE t").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("58030"), "{e:?}");
    c.batch_execute("INSERT INTO t VALUES (9)").await.unwrap();
    assert_eq!(count(&c, "t").await, 4);
    assert!(exists(&direct, "t").await);
}

/// Issue 16's replay: damage in the middle of the log (a record glued onto part of another, as a full disk
/// used to leave it). stepgate refuses to start on it and names `stepgate audit repair`; the repair moves the
/// damaged part aside and records it, the chain verifies, and the token whose `authorized` record was in the
/// damaged part is spent: the same DROP does not run a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_the_middle_stops_start_up_until_repaired_and_never_replays() {
    let direct = setup("aud_damage").await;
    let mut g = gate_with(policy).await;
    let c = g.client("aud_damage").await;
    let tok = sign(&payload("aud_damage", &["DROP TABLE t2"]), &["alice"]);
    c.batch_execute(&set_token(&tok)).await.unwrap();
    c.batch_execute("DROP TABLE t2").await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
    drop(c);
    g.stop().await;
    // Glue the `authorized` record onto a broken line, as a partial write followed by an append did.
    let path = g.state_dir().join("audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let authorized = "{\"application_name\":\"\",\"class\":\"destructive\"";
    let glued = text.replacen(
        authorized,
        &format!("{{\"seq\":99,\"event\":\"he{authorized}"),
        1,
    );
    assert_ne!(glued, text, "{text}");
    std::fs::write(&path, glued).unwrap();

    let refused = stepgate::proxy::Server::bind(g.config.clone())
        .await
        .err()
        .expect("started on a damaged log");
    let message = refused.to_string();
    assert!(
        message.contains("damaged") && message.contains("stepgate audit repair"),
        "{message}"
    );

    let repaired = stepgate::audit::repair::repair(g.state_dir())
        .unwrap()
        .expect("something to repair");
    assert!(repaired.aside.exists());
    let files = stepgate::audit::log_files(g.state_dir());
    let report = stepgate::audit_tool::verify(&files, None, None).unwrap();
    assert!(report.ok, "{:?}", report.error);
    assert!(g.audit().iter().any(|r| r["event"] == "repaired"));

    g.restart().await;
    direct
        .batch_execute("CREATE TABLE t2 (a int)")
        .await
        .unwrap();
    let c = g.client("aud_damage").await;
    c.batch_execute(&set_token(&tok)).await.unwrap();
    let (_, detail) = held(&c.batch_execute("DROP TABLE t2").await.unwrap_err());
    assert!(detail.contains("already_used"), "{detail}");
    assert!(exists(&direct, "t2").await);
}

/// A small tmpfs mounted for one test (root only), unmounted when dropped.
struct SmallDisk {
    at: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("disk");
        std::fs::create_dir(&at).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk { at, _dir: dir })
    }

    /// Fills every free byte with a filler file.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.at.join("filler")).unwrap();
        for chunk in [4096usize, 512, 64, 8, 1] {
            while std::io::Write::write_all(&mut f, &vec![0u8; chunk]).is_ok() {}
        }
    }

    fn free(&self) {
        let _ = std::fs::remove_file(self.at.join("filler"));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.at).status();
    }
}

/// The disk under the state directory fills up and empties again, `DISK_FULL_CYCLES` times (default 10):
/// while it is full a signed DROP is refused with 58030 and does not run; once there is room it runs; no
/// partial record is ever left in the log, and the chain verifies at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_and_empties_never_breaks_the_evidence() {
    let Some(disk) = SmallDisk::mount("16m") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let cycles: usize = std::env::var("DISK_FULL_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let db = "aud_disk_full";
    let direct = setup(db).await;
    let state = disk.at.join("state");
    let g = gate_with(|c| {
        policy(c);
        c.state_dir = state.clone();
    })
    .await;
    let c = g.client(db).await;
    let whole = |state: &std::path::Path| {
        let text = std::fs::read_to_string(state.join("audit.jsonl")).unwrap();
        text.is_empty()
            || text.ends_with('\n')
                && text
                    .lines()
                    .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
    };
    direct
        .batch_execute("CREATE TABLE d (a int)")
        .await
        .unwrap();
    for i in 0..cycles {
        direct
            .batch_execute("INSERT INTO d VALUES (1)")
            .await
            .unwrap();
        // Its record is larger than a page, so it cannot fit in what is left of the log's last page.
        let pad = format!("{i}-{}", "x".repeat(5000));
        let delete = format!("DELETE FROM d WHERE '{pad}' = '{pad}'");
        let tok = sign(&payload(db, &[&delete]), &["alice"]);
        c.batch_execute(&set_token(&tok)).await.unwrap();
        disk.fill();
        let e = c.batch_execute(&delete).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("58030"), "cycle {i}: {e:?}");
        assert_eq!(
            count(&direct, "d").await,
            1,
            "cycle {i}: ran without its record"
        );
        assert!(
            whole(&state),
            "cycle {i}: a partial record was left in the log"
        );
        disk.free();
        c.batch_execute(&delete).await.unwrap();
        assert_eq!(count(&direct, "d").await, 0, "cycle {i}");
        assert!(whole(&state), "cycle {i}");
    }
    let files = stepgate::audit::log_files(&state);
    let report = stepgate::audit_tool::verify(&files, None, None).unwrap();
    assert!(report.ok, "{:?}", report.error);
}

/// An 8 MiB held statement does not become an 8 MiB audit record (nor log line): the held entry keeps its
/// first 64 KiB and says how long it was; its fingerprint is of the whole statement.
#[tokio::test]
async fn a_huge_held_statement_is_kept_in_part() {
    let direct = setup("aud_huge").await;
    let g = gate_with(policy).await;
    let c = g.client("aud_huge").await;
    let huge = format!("DROP TABLE t -- {}", "x".repeat(8 << 20));
    held(&c.batch_execute(&huge).await.unwrap_err());
    assert!(exists(&direct, "t").await);
    let line = std::fs::read_to_string(g.state_dir().join("audit.jsonl"))
        .unwrap()
        .lines()
        .find(|l| l.contains("\"event\":\"held\""))
        .unwrap()
        .to_string();
    assert!(
        line.len() < 200 << 10,
        "a held record of {} bytes",
        line.len()
    );
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    let sql = record["sql"].as_str().unwrap();
    assert!(sql.starts_with("DROP TABLE t -- xxx"), "{}", &sql[..40]);
    assert!(
        sql.ends_with(&format!(
            "[{} bytes in all; the rest is not kept]",
            huge.len()
        )),
        "{}",
        &sql[sql.len() - 80..]
    );
    drop(c);

    // The limit is the config's `max_held_sql`.
    let g = gate_with(|c| {
        policy(c);
        c.max_held_sql = 2048;
    })
    .await;
    let c = g.client("aud_huge").await;
    held(&c.batch_execute(&huge).await.unwrap_err());
    let record = g
        .audit()
        .into_iter()
        .find(|r| r["event"] == "held")
        .unwrap();
    let sql = record["sql"].as_str().unwrap();
    assert!(
        sql.len() < 2048 + 100 && sql.ends_with("the rest is not kept]"),
        "{} bytes: {}",
        sql.len(),
        &sql[sql.len().saturating_sub(80)..]
    );
}

/// `chattr +i` on the log under a running gate (root only): a signed DROP is refused with 58030 and does not
/// run, ordinary statements go on, nothing is half-written; once the operator makes the file writable again
/// the same token works without a restart. A gate does not start on an immutable log, and names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immutable_log_refuses_guarded_statements_until_it_is_writable_again() {
    let db = "aud_immutable";
    let direct = setup(db).await;
    let mut g = gate_with(policy).await;
    let c = g.client(db).await;
    let tok = sign(&payload(db, &["DROP TABLE t2"]), &["alice"]);
    c.batch_execute(&set_token(&tok)).await.unwrap();
    let log = g.state_dir().join("audit.jsonl");
    let chattr = |flag: &str| {
        Command::new("chattr")
            .arg(flag)
            .arg(&log)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !chattr("+i") {
        eprintln!("skipped: chattr +i needs root and a filesystem with the immutable flag");
        return;
    }
    /// Takes the flag off again whatever happens, so the temporary directory can be removed.
    struct Mutable(std::path::PathBuf);
    impl Drop for Mutable {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
    let _mutable = Mutable(log.clone());
    let before = std::fs::read(&log).unwrap();
    let e = c.batch_execute("DROP TABLE t2").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("58030"), "{e:?}");
    assert!(exists(&direct, "t2").await);
    c.batch_execute("INSERT INTO t VALUES (4)").await.unwrap();
    assert_eq!(count(&direct, "t").await, 4);
    assert_eq!(std::fs::read(&log).unwrap(), before, "the log changed");

    assert!(chattr("-i"));
    c.batch_execute("DROP TABLE t2").await.unwrap();
    assert!(!exists(&direct, "t2").await);
    drop(c);
    g.stop().await;
    let report =
        stepgate::audit_tool::verify(&stepgate::audit::log_files(g.state_dir()), None, None)
            .unwrap();
    assert!(report.ok, "{:?}", report.error);

    assert!(chattr("+i"));
    let refused = stepgate::proxy::Server::bind(g.config.clone())
        .await
        .err()
        .expect("started on an immutable log");
    assert!(refused.to_string().contains("audit.jsonl"), "{refused}");
    assert!(chattr("-i"));
    g.restart().await;
    direct
        .batch_execute("CREATE TABLE t2 (a int)")
        .await
        .unwrap();
    let c = g.client(db).await;
    c.batch_execute(&set_token(&tok)).await.unwrap();
    let (_, detail) = held(&c.batch_execute("DROP TABLE t2").await.unwrap_err());
    assert!(detail.contains("already_used"), "{detail}");
    assert!(exists(&direct, "t2").await);
}

/// The disk fills at each step of a signed statement's evidence: `token_set` (the SET is refused and the
/// token gives no authority), `authorized` (refused, does not run), `executed` (the statement already ran:
/// it stays run, the use stays spent) and `committed` (the COMMIT went through on the server). After each,
/// the log holds only whole records, the chain verifies, and no use runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_at_each_step_of_a_signed_statement_keeps_the_evidence_whole() {
    let Some(disk) = SmallDisk::mount("16m") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let db = "aud_full_steps";
    let direct = setup(db).await;
    let state = disk.at.join("state");
    let g = gate_with(|c| {
        policy(c);
        c.state_dir = state.clone();
    })
    .await;
    let c = g.client(db).await;
    // Each record is larger than a page, so none fits in what is left of the log's last page.
    let pad = "x".repeat(5000);
    let drop_t = format!("DROP /*{pad}*/ TABLE t");
    let drop_t2 = format!("DROP /*{pad}*/ TABLE t2");
    let drop_t3 = format!("DROP /*{pad}*/ TABLE t3");
    let check = |step: &str| {
        let text = std::fs::read_to_string(state.join("audit.jsonl")).unwrap();
        assert!(
            text.ends_with('\n')
                && text
                    .lines()
                    .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
            "{step}: a partial record was left in the log"
        );
        let report =
            stepgate::audit_tool::verify(&stepgate::audit::log_files(&state), None, None).unwrap();
        assert!(report.ok, "{step}: {:?}", report.error);
    };

    // token_set
    let tok = sign(&payload(db, &[&drop_t]), &["alice"]);
    disk.fill();
    let e = c.batch_execute(&set_token(&tok)).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("58030"), "{e:?}");
    disk.free();
    held(&c.batch_execute(&drop_t).await.unwrap_err());
    assert!(exists(&direct, "t").await);
    check("token_set");

    // authorized
    c.batch_execute(&set_token(&tok)).await.unwrap();
    disk.fill();
    let e = c.batch_execute(&drop_t).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("58030"), "{e:?}");
    assert!(exists(&direct, "t").await);
    disk.free();
    check("authorized");
    c.batch_execute(&drop_t).await.unwrap();
    assert!(!exists(&direct, "t").await);

    // executed: the disk fills while the string runs, after its `authorized` record and before the DROP's
    // reply.
    let tok2 = sign(&payload(db, &[&drop_t2]), &["alice"]);
    c.batch_execute(&set_token(&tok2)).await.unwrap();
    let slow = format!("SELECT pg_sleep(1); {drop_t2}");
    let (ran, ()) = tokio::join!(c.batch_execute(&slow), async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        disk.fill();
    });
    ran.unwrap();
    assert!(!exists(&direct, "t2").await);
    disk.free();
    check("executed");
    let events_for = |sql: &str| -> Vec<String> {
        g.audit()
            .iter()
            .filter(|r| r["sql"].as_str() == Some(sql))
            .map(|r| r["event"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    // The fault happened where it was meant to: the `executed` record could not be written.
    let events = events_for(&drop_t2);
    assert!(events.contains(&"authorized".to_string()), "{events:?}");
    assert!(!events.contains(&"executed".to_string()), "{events:?}");

    // committed
    let tok3 = sign(&payload(db, &[&drop_t3]), &["alice"]);
    c.batch_execute(&set_token(&tok3)).await.unwrap();
    c.batch_execute(&format!("BEGIN; {drop_t3}")).await.unwrap();
    disk.fill();
    c.batch_execute("COMMIT").await.unwrap();
    assert!(!exists(&direct, "t3").await);
    disk.free();
    check("committed");
    let events = events_for(&drop_t3);
    assert!(events.contains(&"executed".to_string()), "{events:?}");
    assert!(!events.contains(&"committed".to_string()), "{events:?}");

    // No use runs twice: the tables are back, the tokens are set again, the DROPs are held.
    direct
        .batch_execute("CREATE TABLE t (id int); CREATE TABLE t2 (a int); CREATE TABLE t3 (a int)")
        .await
        .unwrap();
    for (tok, sql) in [(&tok, &drop_t), (&tok2, &drop_t2), (&tok3, &drop_t3)] {
        c.batch_execute(&set_token(tok)).await.unwrap();
        let (_, detail) = held(&c.batch_execute(sql).await.unwrap_err());
        assert!(detail.contains("already_used"), "{}: {detail}", &sql[..20]);
    }
    for t in ["t", "t2", "t3"] {
        assert!(exists(&direct, t).await, "{t}");
    }
    check("end");
}

/// The log replaced by a directory under a running gate: guarded statements are refused (58030) and do not
/// run, ordinary ones go on, and the records written before are still whole where they were moved.
#[tokio::test]
async fn a_log_replaced_by_a_directory_refuses_guarded_statements() {
    let db = "aud_log_dir";
    let direct = setup(db).await;
    let g = gate_with(policy).await;
    let c = g.client(db).await;
    let tok = sign(&payload(db, &["DROP TABLE t2"]), &["alice"]);
    c.batch_execute(&set_token(&tok)).await.unwrap();
    let log = g.state_dir().join("audit.jsonl");
    let moved = g.state_dir().join("moved.jsonl");
    std::fs::rename(&log, &moved).unwrap();
    std::fs::create_dir(&log).unwrap();
    let e = c.batch_execute("DROP TABLE t2").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("58030"), "{e:?}");
    assert!(exists(&direct, "t2").await);
    c.batch_execute("INSERT INTO t VALUES (4)").await.unwrap();
    assert_eq!(count(&direct, "t").await, 4);
    let report = stepgate::audit_tool::verify(&[moved], None, None).unwrap();
    assert!(report.ok, "{:?}", report.error);
}
