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
    let db = tokio::task::spawn_blocking(|| DevDb::start(&DevDbOptions::default()))
        .await
        .context("starting PostgreSQL")??;
    db.psql("CREATE DATABASE demo")?;
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

    let result = if opts.check {
        let port = addr.port();
        tokio::task::spawn_blocking(move || walkthrough(port))
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
        println!("  CREATE TABLE notes (id int PRIMARY KEY, body text);");
        println!("  INSERT INTO notes VALUES (1, 'through the gate');");
        println!("  SELECT * FROM notes;");
        println!();
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

fn psql(port: u16, args: &[&str]) -> Result<String> {
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
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        bail!(
            "psql {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(text)
}

fn step(name: &str, r: Result<()>) -> Result<()> {
    match &r {
        Ok(()) => println!("ok    {name}"),
        Err(e) => println!("FAIL  {name}: {e:#}"),
    }
    r
}

fn walkthrough(port: u16) -> Result<()> {
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
        "a table is created, written and read back through stepgate",
        (|| {
            psql(
                port,
                &["-c", "CREATE TABLE notes (id int PRIMARY KEY, body text)"],
            )?;
            psql(
                port,
                &["-c", "INSERT INTO notes VALUES (1, 'through the gate')"],
            )?;
            let got = psql(port, &["-c", "SELECT body FROM notes WHERE id = 1"])?;
            if got != "through the gate" {
                bail!("expected the row back, got {got:?}");
            }
            Ok(())
        })(),
    )?;
    step(
        "the session reaches the server through stepgate (not a local socket)",
        (|| {
            let got = psql(port, &["-c", "SELECT inet_client_addr()::text"])?;
            if !got.starts_with("127.0.0.1") {
                bail!("expected a TCP client address, got {got:?}");
            }
            Ok(())
        })(),
    )?;
    println!("demo check passed");
    Ok(())
}
