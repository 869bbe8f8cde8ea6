//! The `stepgate` binary as a person uses it: `serve` with flags, psql and pgbench through it, signals,
//! config errors, `--version`, `demo --check`, and the docker-compose file.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

use common::serve::{Serve, BIN};

#[test]
fn serve_with_flags_then_psql_select_1() {
    let s = Serve::start(&[]);
    let (ok, out, err) = psql(&s.conninfo("postgres"), &["-c", "select 1"], &[]);
    assert!(ok, "{err}");
    assert_eq!(out, "1");
}

/// What a person does: Ctrl-C in psql while a statement runs. psql sends a CancelRequest to stepgate, which
/// relays it to the session's upstream backend.
#[test]
fn ctrl_c_in_psql_cancels_the_running_statement() {
    let s = Serve::start(&[]);
    let child = Command::new("psql")
        .arg(s.conninfo("postgres"))
        .args(["-X", "-c", "select pg_sleep(30)"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let started = Instant::now();
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "psql took {elapsed:?} after Ctrl-C"
    );
}

/// A person runs a migration with psql: it stops at the held DROP and shows the message, DETAIL and HINT,
/// exactly like a server error: what ran before stays (autocommit) or is rolled back (--single-transaction).
#[test]
fn psql_migration_stops_at_the_held_drop() {
    let s = Serve::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let direct = |sql: &'static str| {
        rt.block_on(async {
            let c = pg().direct_to("cli_migrate").await;
            c.simple_query(sql).await.unwrap();
            c.query("SELECT id FROM notes ORDER BY id", &[])
                .await
                .map(|rows| rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>())
                .unwrap_or_default()
        })
    };
    rt.block_on(pg().create_db("cli_migrate"));
    direct("CREATE TABLE notes (id int PRIMARY KEY, body text)");
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/migrations/0004_cleanup_with_drop.sql"
    );
    for (extra, expected) in [(None, vec![100]), (Some("--single-transaction"), vec![])] {
        direct("DELETE FROM notes");
        let mut args = vec!["-f", file];
        args.extend(extra);
        let mut c = Command::new("psql");
        c.arg(s.conninfo("cli_migrate"))
            .args(["-X", "-v", "ON_ERROR_STOP=1"])
            .args(&args)
            .stdin(Stdio::null());
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(3),
            "psql stops with exit 3 on an error: {err}"
        );
        assert!(
            err.contains(
                "0004_cleanup_with_drop.sql:3: ERROR:  stepgate: statement held (destructive)"
            ),
            "{err}"
        );
        assert!(err.contains("DETAIL:  held id "), "{err}");
        assert!(err.contains("HINT:  stepgate token new --"), "{err}");
        assert!(err.contains(" --held "), "{err}");
        assert_eq!(direct("SELECT 1"), expected, "{extra:?}");
    }
}

#[test]
fn psql_c_and_f_through_stepgate() {
    let s = Serve::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        pg().create_db("cli_smoke").await;
        let c = pg().direct_to("cli_smoke").await;
        c.batch_execute("CREATE TABLE pipe_smoke (id int PRIMARY KEY, note text)")
            .await
            .unwrap();
    });
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/sql/pipe-smoke.sql");
    let (ok, out, err) = psql(&s.conninfo("cli_smoke"), &["-f", fixture], &[]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "starting",
            "INSERT 0 2",
            "BEGIN",
            "UPDATE 1",
            "COMMIT",
            "1|one",
            "2|TWO",
            "COPY 1",
            "3",
            "done"
        ]
    );
    let (ok, out, _) = psql(
        &s.conninfo("cli_smoke"),
        &[
            "-c",
            "select string_agg(note, ',' order by id) from pipe_smoke",
        ],
        &[],
    );
    assert!(ok);
    assert_eq!(out, "one,TWO,three");
}

fn pgbench(args: &[&str]) -> (bool, String) {
    let out = Command::new("pgbench")
        .args(args)
        .env_remove("PGOPTIONS")
        .stdin(Stdio::null())
        .output()
        .expect("pgbench runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn pgbench_select_only_through_stepgate_in_every_protocol_mode() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(pg().create_db("cli_bench"));
    let p = pg();
    let (ok, text) = pgbench(&[
        "-i",
        "-s",
        "1",
        "-h",
        &p.host,
        "-p",
        &p.port.to_string(),
        "-U",
        &p.user,
        "cli_bench",
    ]);
    assert!(ok, "pgbench -i (direct): {text}");
    let s = Serve::start(&[]);
    for mode in ["simple", "extended", "prepared"] {
        let (ok, text) = pgbench(&[
            "-n",
            "-S",
            "-T",
            "3",
            "-c",
            "4",
            "-M",
            mode,
            "-h",
            "127.0.0.1",
            "-p",
            &s.port.to_string(),
            "-U",
            &p.user,
            "cli_bench",
        ]);
        assert!(ok, "{mode}: {text}");
        assert!(
            text.contains("number of failed transactions: 0 (0.000%)"),
            "{mode}: {text}"
        );
        let processed: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(processed > 100, "{mode}: {text}");
    }
}

#[test]
fn sigterm_lets_a_running_statement_finish_then_exits() {
    let mut s = Serve::start(&[]);
    let ci = s.conninfo("postgres");
    let sleeper =
        std::thread::spawn(move || psql(&ci, &["-c", "select pg_sleep(1.5), 'finished'"], &[]));
    std::thread::sleep(Duration::from_millis(500));
    s.signal("-TERM");
    std::thread::sleep(Duration::from_millis(300));
    // New sessions are no longer accepted.
    let (ok, _, _) = psql(&s.conninfo("postgres"), &["-c", "select 1"], &[]);
    assert!(!ok, "a new session was accepted after SIGTERM");
    let (ok, out, err) = sleeper.join().unwrap();
    assert!(ok, "{err}");
    assert!(out.ends_with("finished"), "{out}");
    let started = Instant::now();
    loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "stepgate did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn json_logs_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let port = stepgate::devdb::free_port();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--log-format",
            "json",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &pg().addr(),
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["message"], "stepgate is accepting connections", "{line}");
}

#[test]
fn config_mistakes_name_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stepgate.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:6432\"\n\nupstrem = \"127.0.0.1:5432\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stepgate.toml"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("upstrem"), "{err}");
    // An audit log that is a directory: the cause is said once, not once per layer that carries it (it was
    // "…: Is a directory (os error 21): …: Is a directory (os error 21): Is a directory (os error 21)").
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("audit.jsonl")).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("audit.jsonl"), "{err}");
    assert_eq!(last.matches("(os error").count(), 1, "{err}");
}

#[test]
fn sample_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/stepgate.toml");
    stepgate::config::Config::load(Some(std::path::Path::new(path)), &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("stepgate {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--upstream",
        "--state-dir",
        "--upstream-tls",
        "--log-format",
        "Examples",
    ] {
        assert!(help.contains(flag), "serve --help lacks {flag}");
    }
}

#[test]
fn demo_check_runs_the_walkthrough() {
    let out = Command::new(BIN)
        .args(["demo", "--check"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("demo check passed"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn docker_compose_wires_postgres_and_stepgate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let services = &doc["services"];
    assert!(services["postgres"].is_mapping(), "postgres service");
    let sg = &services["stepgate"];
    assert!(sg.is_mapping(), "stepgate service");
    // Built from the repo's Dockerfile.
    let context = sg["build"]["context"].as_str().unwrap_or(".");
    let dockerfile = sg["build"]["dockerfile"].as_str().unwrap_or("Dockerfile");
    assert!(
        root.join(context).join(dockerfile).is_file(),
        "Dockerfile exists"
    );
    // Port 6432 published.
    let ports: Vec<String> = sg["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(ports.iter().any(|p| p.ends_with(":6432")), "{ports:?}");
    // The mounted config exists in the repo and points at the postgres service.
    let volumes = sg["volumes"].as_sequence().unwrap();
    let mut config_found = false;
    let mut state_volume = false;
    for v in volumes {
        let v = v.as_str().unwrap();
        let (src, dst) = v.split_once(':').unwrap();
        if src.starts_with("./") {
            let path = root.join(src);
            assert!(path.exists(), "mounted {src} exists");
            if dst.trim_end_matches(":ro").ends_with(".toml") {
                config_found = true;
                let cfg = stepgate::config::Config::load(Some(&path), &Default::default()).unwrap();
                assert_eq!(cfg.upstream, "postgres:5432");
                assert!(cfg.listen.ends_with(":6432"));
            }
        } else if doc["volumes"][src].is_mapping() || doc["volumes"].get(src).is_some() {
            state_volume = true;
        }
    }
    assert!(config_found, "a config file is mounted");
    assert!(state_volume, "a named volume holds the state directory");
    let depends = format!("{:?}", sg["depends_on"]);
    assert!(depends.contains("postgres"), "stepgate depends on postgres");
}

#[test]
fn serve_relays_holds_and_stops_on_either_runtime_shape() {
    let default = stepgate::proxy::default_workers();
    // Default: one worker per two CPUs (at least one); --workers 3: three; --workers 0: the
    // multi-threaded main runtime.
    for (args, workers) in [
        (&[][..], default),
        (&["--workers", "3"][..], 3),
        (&["--workers", "0"][..], 0),
    ] {
        relays_holds_and_stops(args, workers);
    }
}

fn relays_holds_and_stops(args: &[&str], workers: usize) {
    let mut s = Serve::start(args);
    let field = format!("workers={workers}");
    assert!(
        s.log().lines().any(
            |l| l.contains("accepting connections") && l.split_whitespace().any(|w| w == field)
        ),
        "{args:?}: {}",
        s.log()
    );
    for _ in 0..4 {
        let (ok, out, err) = psql(&s.conninfo("postgres"), &["-c", "select 1"], &[]);
        assert!(ok, "{err}");
        assert_eq!(out, "1");
    }
    let (ok, _, err) = psql(
        &s.conninfo("postgres"),
        &["-c", "DROP TABLE IF EXISTS no_such_table_here"],
        &[],
    );
    assert!(!ok && err.contains("statement held (destructive)"), "{err}");
    // The log line names the session it came from, on the epoll relay as on the async path.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let named = |log: &str| {
        log.lines()
            .any(|l| l.contains("statement held") && l.contains("session{id="))
    };
    while !named(&s.log()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(named(&s.log()), "{args:?}: {}", s.log());
    s.signal("-TERM");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// Log injection: a held statement whose text carries a newline and a forged log line stays on its own
/// line in the text log (the newline is written as `\n`), so no `authorized` line can be forged.
#[test]
fn a_statement_cannot_forge_a_log_line() {
    let s = Serve::start(&[]);
    let forged = "DROP TABLE nosuch_forge\n2026-12-02T00:00:00.000000Z  INFO authorized user=alice token_id=\"forged\"";
    let (ok, _, err) = psql(&s.conninfo("postgres"), &["-c", forged], &[]);
    assert!(!ok && err.contains("statement held"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.log().contains("statement held") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = s.log();
    let held: Vec<&str> = log.lines().filter(|l| l.contains("forged")).collect();
    assert_eq!(held.len(), 1, "{log}");
    assert!(
        held[0].contains("statement held") && held[0].contains("nosuch_forge\\n2026"),
        "{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("2026-12-02T00:00:00")),
        "{log}"
    );
}

/// Back-pressure: a client that pipelines millions of Syncs without reading a reply is held back once it
/// waits for 65,536 replies, on both relays, instead of growing stepgate by ~110 bytes per message (issue
/// 16 measured 310 MB for 2.76 M Syncs). Measured on the `stepgate serve` process's resident memory.
#[test]
fn a_client_that_pipelines_without_reading_is_held_back() {
    for workers in ["1", "0"] {
        let s = Serve::start(&["--workers", workers]);
        let rss_kb = || -> u64 {
            let status = std::fs::read_to_string(format!("/proc/{}/status", s.child.id())).unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        let before = rss_kb();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let addr = format!("127.0.0.1:{}", s.port).parse().unwrap();
            let mut c = common::raw::Raw::login(addr, &pg().user, "postgres", &[]).await;
            let burst = b"S\0\0\0\x04".repeat(3_000_000);
            // Once held back, the client's own send blocks: that is the point.
            let _ = tokio::time::timeout(Duration::from_secs(10), c.send(&burst)).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let grown_mb = rss_kb().saturating_sub(before) / 1024;
            assert!(
                grown_mb < 100,
                "--workers {workers}: stepgate grew by {grown_mb} MB for a client that does not read"
            );
        });
    }
}
