//! `stepgate demo`: a throwaway PostgreSQL with stepgate in front of it, for a first look and for CI.
//!
//! Interactive mode prints how to connect and runs until Ctrl-C; `--check` runs the walkthrough unattended
//! with real `psql` processes and returns whether every step behaved as documented.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::devdb::{DevDb, DevDbOptions, SUPERUSER};
use crate::proxy::Server;

pub struct DemoOptions {
    pub listen: String,
    pub check: bool,
}

/// Runs the demo. In `--check` mode returns an error naming the first step that did not behave.
pub async fn run(opts: DemoOptions) -> Result<()> {
    eprintln!("starting a throwaway PostgreSQL …");
    let db = std::sync::Arc::new(
        tokio::task::spawn_blocking(|| DevDb::start(&DevDbOptions::default()))
            .await
            .context("starting PostgreSQL")??,
    );
    db.psql("CREATE DATABASE demo")?;
    // The demo table is created directly on PostgreSQL: through stepgate, CREATE TABLE is held.
    demo_table(&db)?;
    let state = tempfile::tempdir().context("creating a state directory")?;
    let config = Config {
        listen: opts.listen.clone(),
        upstream: db.addr(),
        state_dir: state.path().join("state"),
        ..Config::default()
    };
    let server = Server::bind(config).await?;
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    let psql = format!(
        "psql -h {} -p {} -U {SUPERUSER} demo",
        addr.ip(),
        addr.port()
    );

    let state_dir = state.path().join("state");
    let result = if opts.check {
        let port = addr.port();
        let db = db.clone();
        tokio::task::spawn_blocking(move || walkthrough(port, &db, &state_dir))
            .await
            .context("walkthrough")?
    } else {
        println!();
        println!("stepgate demo is running");
        println!(
            "  PostgreSQL (throwaway) on {}   data in {}",
            db.addr(),
            db.socket_dir().display()
        );
        println!("  stepgate on {addr}  ->  {}", db.addr());
        println!();
        println!("Connect through stepgate:");
        println!("  {psql}");
        println!();
        println!("Try:");
        println!("  SELECT * FROM notes;                          -- passes");
        println!("  INSERT INTO notes VALUES (3, 'written');       -- passes");
        println!("  UPDATE notes SET body = 'x' WHERE id = 3;     -- passes");
        println!("  DROP TABLE notes;                             -- held: ERROR 42501 stepgate: statement held (destructive)");
        println!("  UPDATE notes SET body = 'oops';               -- held: no WHERE");
        println!("  SHOW stepgate.status;");
        println!();
        println!(
            "Held statements are recorded in {}",
            state_dir.join("audit.jsonl").display()
        );
        println!("Press Ctrl-C to stop; the database and its files are removed.");
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        eprintln!("stopping …");
        Ok(())
    };
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(35), task).await;
    drop(db);
    result
}

fn demo_table(db: &DevDb) -> Result<()> {
    db.psql_in(
        "demo",
        "CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'hello'), (2, 'world')",
    )
    .context("creating the demo table")?;
    Ok(())
}

/// psql through stepgate; returns (success, stdout, stderr).
fn psql_raw(port: u16, args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            SUPERUSER,
            "-d",
            "demo",
            "-X",
            "-At",
        ])
        .args(["-v", "ON_ERROR_STOP=1"])
        .args(args)
        .env_remove("PGOPTIONS")
        .stdin(Stdio::null())
        .output()
        .context("running psql")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

fn psql(port: u16, args: &[&str]) -> Result<String> {
    let (ok, out, err) = psql_raw(port, args)?;
    if !ok {
        bail!("psql {args:?} failed: {err}");
    }
    Ok(out)
}

fn step(name: &str, r: Result<()>) -> Result<()> {
    match &r {
        Ok(()) => println!("ok    {name}"),
        Err(e) => println!("FAIL  {name}: {e:#}"),
    }
    r
}

fn walkthrough(port: u16, db: &DevDb, state_dir: &std::path::Path) -> Result<()> {
    step(
        "psql connects through stepgate and runs SELECT 1",
        (|| {
            let got = psql(port, &["-c", "select 1"])?;
            if got != "1" {
                bail!("expected 1, got {got:?}");
            }
            Ok(())
        })(),
    )?;
    step(
        "reads and writes pass: INSERT, UPDATE … WHERE, SELECT",
        (|| {
            psql(
                port,
                &["-c", "INSERT INTO notes VALUES (3, 'through the gate')"],
            )?;
            psql(
                port,
                &[
                    "-c",
                    "UPDATE notes SET body = 'through the gate!' WHERE id = 3",
                ],
            )?;
            let got = psql(port, &["-c", "SELECT body FROM notes WHERE id = 3"])?;
            if got != "through the gate!" {
                bail!("expected the row back, got {got:?}");
            }
            Ok(())
        })(),
    )?;
    let mut held_id = String::new();
    step(
        "DROP TABLE is held with SQLSTATE 42501, a held id and the command to sign it",
        (|| {
            let (ok, _, err) =
                psql_raw(port, &["-v", "VERBOSITY=verbose", "-c", "DROP TABLE notes"])?;
            if ok {
                bail!("DROP TABLE ran");
            }
            if !err.contains("42501") || !err.contains("stepgate: statement held (destructive)") {
                bail!("unexpected error: {err}");
            }
            held_id = err
                .split("held id ")
                .nth(1)
                .and_then(|r| r.get(..8))
                .map(str::to_string)
                .ok_or_else(|| anyhow::anyhow!("no held id in: {err}"))?;
            if !err.contains(&format!("stepgate token new --held {held_id}")) {
                bail!("no signing hint in: {err}");
            }
            Ok(())
        })(),
    )?;
    step(
        "the table still exists (checked directly on PostgreSQL)",
        (|| {
            let got = db
                .psql_in("demo", "SELECT count(*) FROM notes")?
                .trim()
                .to_string();
            if got != "3" {
                bail!("expected 3 rows, got {got:?}");
            }
            Ok(())
        })(),
    )?;
    step(
        "UPDATE without WHERE is held too",
        (|| {
            let (ok, _, err) = psql_raw(port, &["-c", "UPDATE notes SET body = 'oops'"])?;
            if ok || !err.contains("statement held (destructive)") {
                bail!("expected a hold, got ok={ok} {err}");
            }
            Ok(())
        })(),
    )?;
    step(
        "the held statement is in the audit log",
        (|| {
            let log = std::fs::read_to_string(state_dir.join("audit.jsonl"))?;
            if !log
                .lines()
                .any(|l| l.contains("\"event\":\"held\"") && l.contains(&held_id))
            {
                bail!("no held record for {held_id}");
            }
            Ok(())
        })(),
    )?;
    println!("demo check passed");
    Ok(())
}
