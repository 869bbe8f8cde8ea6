//! `stepgate demo`: a throwaway PostgreSQL with stepgate in front of it, for a first look and for CI.
//!
//! A demo signing key is generated at start (in the throwaway state directory) and named as the one signer,
//! so the whole step-up flow can be tried: a DROP is held, `stepgate token new --held` makes the payload,
//! `stepgate token sign` signs it, and `SET stepgate.token` lets the DROP run once.
//!
//! Interactive mode prints how to connect and runs until Ctrl-C; `--check` runs the walkthrough unattended
//! with real `psql` processes and returns whether every step behaved as documented.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio_util::sync::CancellationToken;

use stepgate::config::Config;
use stepgate::devdb::{DevDb, DevDbOptions, SCRAM_PASSWORD, SCRAM_USER, SUPERUSER};
use stepgate::proxy::Server;

pub struct DemoOptions {
    pub listen: String,
    pub check: bool,
}

/// Runs the demo. In `--check` mode returns an error naming the first step that did not behave.
pub async fn run(opts: DemoOptions) -> Result<()> {
    // The port first: a taken one is said at once, not after PostgreSQL has started.
    if let Err(e) = std::net::TcpListener::bind(&opts.listen) {
        bail!(
            "cannot listen on {}: {e}; choose another address, e.g. stepgate demo --listen 127.0.0.1:6433",
            opts.listen
        );
    }
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
    let (key_file, signer) = demo_key(state.path())?;
    let config = Config {
        listen: opts.listen.clone(),
        upstream: db.addr(),
        state_dir: state.path().join("state"),
        keyring: Some(state.path().join("keys")),
        signers: vec![signer],
        // The console, for the throwaway server's password role (the console takes password logins only).
        admin: Some(stepgate::config::AdminConfig {
            users: vec![SCRAM_USER.to_string()],
            listen: None,
            auth_database: "postgres".into(),
        }),
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
        let key_file = key_file.clone();
        tokio::task::spawn_blocking(move || walkthrough(port, &db, &state_dir, &key_file))
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
        let me = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "stepgate".into());
        let tok = state.path().join("drop.asc");
        println!("Then authorize the held DROP with the demo signing key (use the held id from the error):");
        println!(
            "  {me} token new --state-dir {} --held <held id> \\",
            state_dir.display()
        );
        println!(
            "    | {me} token sign --key {} > {}",
            key_file.display(),
            tok.display()
        );
        println!("  and in psql:");
        println!("  \\set tok `cat {}`", tok.display());
        println!("  SET stepgate.token = :'tok';");
        println!("  DROP TABLE notes;                             -- runs, once");
        println!();
        println!("Or look at it in the DBA console (its password is {SCRAM_PASSWORD}):");
        println!(
            "  PGPASSWORD={SCRAM_PASSWORD} psql -h {} -p {} -U {SCRAM_USER} stepgate",
            addr.ip(),
            addr.port()
        );
        println!("  SHOW HELD;  SHOW HELD <held id>;  SHOW SESSIONS;  SHOW AUDIT 10;  HELP;");
        println!();
        println!(
            "Everything is recorded in {}",
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

/// Generates the demo signer: secret key file, public key in `<dir>/keys/`, and its `[[signer]]` entry.
fn demo_key(dir: &std::path::Path) -> Result<(std::path::PathBuf, stepgate::token::SignerPolicy)> {
    use sequoia_openpgp::cert::prelude::*;
    use sequoia_openpgp::serialize::Serialize;
    let (cert, _) =
        CertBuilder::general_purpose(Some("stepgate demo signer <demo@stepgate.invalid>"))
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_creation_time(std::time::SystemTime::now() - Duration::from_secs(60))
            .generate()
            .context("generating the demo signing key")?;
    std::fs::create_dir_all(dir.join("keys"))?;
    let mut public = Vec::new();
    cert.armored()
        .serialize(&mut public)
        .context("exporting the demo key")?;
    std::fs::write(dir.join("keys").join("demo.asc"), public)?;
    let mut secret = Vec::new();
    cert.as_tsk()
        .armored()
        .serialize(&mut secret)
        .context("exporting the demo key")?;
    let key_file = dir.join("demo-signer.sec.asc");
    // A secret key: readable by its owner only.
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_file)
            .and_then(|mut f| f.write_all(&secret))
            .with_context(|| format!("writing {}", key_file.display()))?;
    }
    Ok((
        key_file,
        stepgate::token::SignerPolicy {
            name: "demo".into(),
            fingerprint: cert.fingerprint().to_hex(),
            databases: vec!["*".into()],
            classes: stepgate::classify::Class::DEFAULT_GUARDED.to_vec(),
        },
    ))
}

fn demo_table(db: &DevDb) -> Result<()> {
    db.psql_in(
        "demo",
        "CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'hello'), (2, 'world')",
    )
    .context("creating the demo table")?;
    Ok(())
}

/// One value read straight from PostgreSQL (not through stepgate), trimmed.
fn direct_value(db: &DevDb, sql: &str) -> Result<String> {
    Ok(db.psql_in("demo", sql)?.trim().to_string())
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
        Err(e) => println!("FAIL  {name}: {}", super::report(e)),
    }
    r
}

fn walkthrough(
    port: u16,
    db: &DevDb,
    state_dir: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<()> {
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
            if !err.contains("stepgate token new --")
                || !err.contains(&format!(" --held {held_id} | gpg --clearsign"))
            {
                bail!("no signing hint in: {err}");
            }
            Ok(())
        })(),
    )?;
    step(
        "the table still exists (checked directly on PostgreSQL)",
        (|| {
            let got = direct_value(db, "SELECT count(*) FROM notes")?;
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
    step(
        "the DBA console shows it (SHOW HELD, a password admin)",
        (|| {
            let out = Command::new("psql")
                .arg(format!(
                    "host=127.0.0.1 port={port} user={SCRAM_USER} dbname=stepgate sslmode=disable"
                ))
                .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", "SHOW HELD"])
                .env("PGPASSWORD", SCRAM_PASSWORD)
                .env_remove("PGOPTIONS")
                .stdin(Stdio::null())
                .output()
                .context("running psql")?;
            let shown = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() || !shown.contains(&held_id) {
                bail!(
                    "SHOW HELD did not list {held_id}: {shown}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        })(),
    )?;
    let dir = state_dir.parent().unwrap_or(state_dir).to_path_buf();
    let script = dir.join("drop.sql");
    step(
        "token new --held, token sign, SET stepgate.token: the DROP runs",
        (|| {
            let config = Config {
                state_dir: state_dir.to_path_buf(),
                ..Config::default()
            };
            let payload = super::token_ops::new_payload(
                &super::token_ops::NewToken {
                    config: &config,
                    database: None,
                    user: None,
                    ttl: Duration::from_secs(600),
                    reason: Some("stepgate demo".into()),
                    sources: vec![super::token_ops::Source::Held(held_id.clone())],
                },
                std::time::SystemTime::now(),
            )?;
            let keys = super::token_ops::read_secret_keys(&[key_file.display().to_string()])?;
            let token = super::token_ops::sign(payload.text.as_bytes(), &keys, None)?;
            let tok = dir.join("drop.asc");
            std::fs::write(&tok, token)?;
            std::fs::write(
                &script,
                format!(
                    "\\set tok `cat {}`\nSET stepgate.token = :'tok';\nDROP TABLE notes;\n",
                    tok.display()
                ),
            )?;
            psql(port, &["-f", &script.display().to_string()])?;
            let gone = direct_value(db, "SELECT to_regclass('notes') IS NULL")?;
            if gone != "t" {
                bail!("the table is still there");
            }
            Ok(())
        })(),
    )?;
    step(
        "the same token cannot drop the table again (already_used)",
        (|| {
            demo_table(db)?;
            let (ok, _, err) = psql_raw(port, &["-f", &script.display().to_string()])?;
            if ok || !err.contains("already_used") {
                bail!("expected already_used, got ok={ok} {err}");
            }
            Ok(())
        })(),
    )?;
    println!("demo check passed");
    Ok(())
}
