//! `stepgate check` as CI and people use it: exit codes, the documented JSON Lines, the text table.

use std::io::Write;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_stepgate");

fn run(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .arg("check")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that fails on its arguments exits without reading its input: a broken pipe is its answer.
    let written = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn harmless_stdin_exits_0() {
    let (code, out, _) = run(&["-"], "select 1\n");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("-:1") && out.contains("read") && out.contains("select 1"),
        "{out}"
    );
}

#[test]
fn migrations_as_json_lines() {
    let (code, out, err) = run(
        &[
            "--format",
            "json",
            "fixtures/migrations/0001_init.sql",
            "fixtures/migrations/0002_status.sql",
            "fixtures/migrations/0003_retire_staging.sql",
        ],
        "",
    );
    assert_eq!(code, 1, "{out}{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for r in &rows {
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        let mut keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "class",
                "file",
                "fingerprint",
                "guarded",
                "index",
                "line",
                "reason",
                "sql"
            ]
        );
        assert!(r["fingerprint"].as_str().unwrap().starts_with("sha256:"));
        assert_eq!(r["fingerprint"].as_str().unwrap().len(), 71);
    }
    let pick = |file: &str, index: u64| {
        rows.iter()
            .find(|r| r["file"].as_str().unwrap().ends_with(file) && r["index"] == index)
            .unwrap_or_else(|| panic!("{file} #{index} in {out}"))
    };
    let create = pick("0001_init.sql", 0);
    assert_eq!(
        (create["line"].as_u64(), create["class"].as_str()),
        (Some(2), Some("ddl"))
    );
    assert!(create["sql"]
        .as_str()
        .unwrap()
        .starts_with("CREATE TABLE customers ("));
    assert!(create["sql"].as_str().unwrap().ends_with(")"));
    let insert = pick("0001_init.sql", 3);
    assert_eq!(
        (insert["class"].as_str(), insert["guarded"].as_bool()),
        (Some("write"), Some(false))
    );
    let update = pick("0002_status.sql", 1);
    assert_eq!(
        (update["line"].as_u64(), update["class"].as_str()),
        (Some(4), Some("write"))
    );
    let function = pick("0002_status.sql", 2);
    assert_eq!(function["class"].as_str(), Some("ddl"));
    // The meta-command lines are skipped: BEGIN is statement 0 on line 3.
    let begin = pick("0003_retire_staging.sql", 0);
    assert_eq!(
        (begin["line"].as_u64(), begin["sql"].as_str()),
        (Some(3), Some("BEGIN"))
    );
    let drop = pick("0003_retire_staging.sql", 1);
    assert_eq!(
        (
            drop["class"].as_str(),
            drop["guarded"].as_bool(),
            drop["sql"].as_str()
        ),
        (
            Some("destructive"),
            Some(true),
            Some("DROP TABLE IF EXISTS staging_orders")
        )
    );
    let alter = pick("0003_retire_staging.sql", 2);
    assert_eq!(alter["class"].as_str(), Some("destructive"));
    assert_eq!(
        rows.iter()
            .filter(|r| r["file"]
                .as_str()
                .unwrap()
                .ends_with("0003_retire_staging.sql"))
            .count(),
        4
    );
}

#[test]
fn config_rule_decides_what_is_guarded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("stepgate.toml");
    std::fs::write(
        &cfg,
        "dangerous_functions = [\"wipe_everything\"]\n[[rule]]\ndatabase = \"scratch\"\nguard = [\"privileged\"]\n",
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    // In scratch, DROP is not guarded; a call to the configured function is.
    let (code, out, _) = run(
        &["--config", cfg, "--database", "scratch", "-"],
        "drop table t;\n",
    );
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = run(
        &["--config", cfg, "--database", "scratch", "-"],
        "select wipe_everything();\n",
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("privileged"));
    // Other databases fall back to the default rule.
    let (code, _, _) = run(
        &["--config", cfg, "--database", "prod", "-"],
        "drop table t;\n",
    );
    assert_eq!(code, 1);
    // pg_terminate_backend is no longer on the (replaced) list.
    let (code, _, _) = run(
        &["--config", cfg, "--database", "prod", "-"],
        "select pg_terminate_backend(1);\n",
    );
    assert_eq!(code, 0);
}

#[test]
fn errors_exit_2() {
    let (code, _, err) = run(&["no/such/file.sql"], "");
    assert_eq!(code, 2);
    assert!(err.contains("no/such/file.sql"), "{err}");
    let (code, _, _) = run(&["--format", "yaml", "-"], "");
    assert_eq!(code, 2);
    let (code, _, err) = run(&["--config", "no/such.toml", "-"], "select 1");
    assert_eq!(code, 2);
    assert!(err.contains("no/such.toml"), "{err}");
}

/// One file that is not UTF-8 is an error for that file: the others are still checked and printed.
#[test]
fn an_undecodable_file_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.sql");
    std::fs::write(&bad, b"select '\xff';\n").unwrap();
    let (code, out, err) = run(
        &[
            "--format",
            "json",
            bad.to_str().unwrap(),
            "fixtures/migrations/0001_init.sql",
        ],
        "",
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("bad.sql"), "{err}");
    assert!(out.contains("0001_init.sql"), "{out}");
}

/// psql scripts are split where psql sends them; the DROP after a meta-command is never swallowed.
#[test]
fn psql_meta_commands_split_statements() {
    for script in [
        "SELECT 1\\; DROP TABLE t;\n",
        "SELECT 1 \\crosstabview\nDROP TABLE t;\n",
        "SELECT 1 \\watch 1\nDROP TABLE t;\n",
        "SELECT $1 \\bind 5 \\g\nDROP TABLE t;\n",
        "COPY t FROM stdin;\nx\n\\.\nDROP TABLE t;\n",
    ] {
        let (code, out, err) = run(&["--format", "json", "-"], script);
        assert_eq!(code, 1, "{script:?}: {out}{err}");
        assert!(
            out.lines()
                .any(|l| l.contains("\"sql\":\"DROP TABLE t\"") && l.contains("destructive")),
            "{script:?}: {out}"
        );
    }
}
