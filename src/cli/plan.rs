//! `stepgate plan`: the dry run migration tools lack. Starts a throwaway PostgreSQL (loaded with the target's
//! schema when `--schema-from` names it), puts an observe-mode stepgate with the real config's rules in front
//! of it, runs the migration command against that, and prints the token payload of every guarded statement
//! the command sent, in order — for the real database and user, ready for `gpg --clearsign`.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use stepgate::config::{Config, Mode, Overrides};
use stepgate::devdb::{DevDb, DevDbOptions, SUPERUSER};
use stepgate::proxy::Server;
use stepgate::token::payload::{Payload, StatementGrant};
use tokio_util::sync::CancellationToken;

pub struct PlanOptions {
    pub config: Option<PathBuf>,
    pub database: String,
    pub user: Option<String>,
    pub schema_from: Option<String>,
    pub ttl: Duration,
    pub reason: Option<String>,
    /// Print `[[allow]]` entries named after this tool instead of a payload.
    pub preset: Option<String>,
    pub command: Vec<String>,
}

/// The tables migration tools keep their applied migrations in: their rows are copied by `--schema-from`.
const BOOKKEEPING_TABLES: &[&str] = &[
    "schema_migrations",
    "alembic_version",
    "knex_migrations",
    "knex_migrations_lock",
    "_sqlx_migrations",
    "django_migrations",
    "pgmigrations",
    "flyway_schema_history",
];

/// A name safe inside double quotes in SQL.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub async fn run(o: PlanOptions) -> Result<ExitCode> {
    let Some((program, args)) = o.command.split_first() else {
        bail!("no command to plan: stepgate plan … -- <migration command>");
    };
    let config = Config::load(o.config.as_deref(), &Overrides::default())?;
    eprintln!("stepgate plan: starting a throwaway PostgreSQL …");
    let db = tokio::task::spawn_blocking(|| DevDb::start(&DevDbOptions::default()))
        .await
        .context("starting PostgreSQL")??;
    db.psql(&format!("CREATE DATABASE {}", quote_ident(&o.database)))?;
    let user = o.user.clone().unwrap_or_else(|| SUPERUSER.to_string());
    if user != SUPERUSER {
        db.psql(&format!(
            "CREATE ROLE {} LOGIN SUPERUSER",
            quote_ident(&user)
        ))?;
    }
    if let Some(from) = &o.schema_from {
        eprintln!("stepgate plan: loading the schema of {}", redact_url(from));
        let dump = Command::new("pg_dump")
            .args([
                "--schema-only",
                "--no-owner",
                "--no-privileges",
                "--dbname",
                from,
            ])
            .stderr(Stdio::inherit())
            .output()
            .context("running pg_dump (is it on PATH?)")?;
        if !dump.status.success() {
            bail!("pg_dump --schema-only of {} failed", redact_url(from));
        }
        // Runs SQL text in the throwaway database with psql (errors in it do not stop it).
        let file = tempfile::NamedTempFile::new()?;
        let load = |sql: &[u8]| -> Result<bool> {
            std::fs::write(file.path(), sql)?;
            Ok(Command::new("psql")
                .args(["-X", "-q", "-h", "127.0.0.1", "-p", &db.port().to_string()])
                .args(["-U", SUPERUSER, "-d", &o.database, "-f"])
                .arg(file.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("running psql")?
                .success())
        };
        if !load(&dump.stdout)? {
            eprintln!("stepgate plan: warning: the schema did not load");
        }
        // A tool knows what it applied from the rows of its own bookkeeping table: those rows come too, so
        // the plan lists only what the real database has not had yet.
        let mut data = Command::new("pg_dump");
        data.args(["--data-only", "--no-owner", "--dbname", from]);
        for t in BOOKKEEPING_TABLES {
            data.args(["--table", &format!("*.{t}")]);
        }
        if let Ok(rows) = data.stderr(Stdio::null()).output() {
            if rows.status.success() && !rows.stdout.is_empty() {
                load(&rows.stdout)?;
            }
        }
    }
    let state = tempfile::tempdir()?;
    let observe = Config {
        listen: "127.0.0.1:0".into(),
        upstream: db.addr(),
        state_dir: state.path().join("state"),
        mode: Mode::Observe,
        tls: None,
        admin: None,
        metrics_listen: None,
        ..config.clone()
    };
    let server = Server::bind(observe).await?;
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let url = format!("postgres://{user}@{host}:{port}/{}", o.database);
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.replace("{url}", &url)
                .replace("{host}", &host)
                .replace("{port}", &port)
        })
        .collect();
    eprintln!(
        "stepgate plan: running {program} {} against it",
        args.join(" ")
    );
    let mut cmd = Command::new(program);
    cmd.args(&args)
        .env("PGHOST", &host)
        .env("PGPORT", &port)
        .env("PGDATABASE", &o.database)
        .env("PGUSER", &user)
        .env("DATABASE_URL", &url)
        .env("PGSSLMODE", "disable")
        .env_remove("PGOPTIONS")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        // The command's output goes to stderr: stdout is the payload.
        .stdout(std::io::stderr());
    let status = tokio::task::block_in_place(|| cmd.status())
        .with_context(|| format!("running {program}"))?;
    shutdown.cancel();
    let _ = task.await;

    let records = stepgate::audit::AuditLog::read_dir(&state.path().join("state"))?;
    let classifier = stepgate::classify::Classifier::for_config(&config);
    let mut statements = Vec::new();
    for r in records.iter().filter(|r| r["event"] == "observed") {
        for s in r["statements"].as_array().into_iter().flatten() {
            let Some(sql) = s.as_str() else { continue };
            let class = stepgate::token::verify::class_of(&classifier, sql)
                .map_err(|e| anyhow!("{sql}: {e}"))?;
            let fingerprint = stepgate::token::payload::fingerprint_of(sql)
                .ok_or_else(|| anyhow!("not one statement: {sql}"))?;
            statements.push(StatementGrant {
                fingerprint,
                class,
                sql: sql.to_string(),
            });
        }
    }
    let allowed = records.iter().filter(|r| r["event"] == "allowed").count();
    if !status.success() {
        eprintln!(
            "stepgate plan: {program} failed ({status}); no payload is printed (the statements it sent up to then: {})",
            statements.len()
        );
        return Ok(ExitCode::from(
            status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .filter(|c| *c != 0)
                .unwrap_or(1),
        ));
    }
    eprintln!(
        "stepgate plan: {} guarded statement(s) for database {:?}{}{}:",
        statements.len(),
        o.database,
        o.user
            .as_ref()
            .map(|u| format!(", user {u:?}"))
            .unwrap_or_default(),
        if allowed > 0 {
            format!(" ({allowed} more passed by [[allow]] entries)")
        } else {
            String::new()
        }
    );
    for (i, s) in statements.iter().enumerate() {
        let line = s.sql.split_whitespace().collect::<Vec<_>>().join(" ");
        let short: String = line.chars().take(100).collect();
        eprintln!("  {:>3}. {:<11} {short}", i + 1, s.class.as_str());
    }
    if let Some(tool) = &o.preset {
        print!("{}", preset_toml(tool, &o.command.join(" "), &statements));
        return Ok(ExitCode::SUCCESS);
    }
    if statements.is_empty() {
        eprintln!("stepgate plan: nothing to sign");
        return Ok(ExitCode::SUCCESS);
    }
    let payload = Payload {
        id: stepgate::token::new_uuid(),
        instance: config.instance.clone(),
        database: o.database.clone(),
        user: o.user.clone(),
        not_before: None,
        not_after: SystemTime::now() + o.ttl,
        statements,
        reason: o.reason.clone(),
    };
    let text = payload.render();
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

/// `[[allow]]` entries for the distinct statements a tool sent (its bookkeeping, when it ran with no
/// migrations of the user's), in the order first sent, as `fixtures/allow/*.toml` has them.
fn preset_toml(tool: &str, command: &str, statements: &[StatementGrant]) -> String {
    let mut out = format!(
        "# {tool}: the guarded statements `{command}` sent, from a run through stepgate plan ({}).\n\
         # Use it with include = [\"<this file>\"]; every entry lets exactly that statement pass without a token.\n",
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    let mut seen = std::collections::HashSet::new();
    for s in statements {
        if !seen.insert(s.fingerprint.clone()) {
            continue;
        }
        let words = s
            .sql
            .split_whitespace()
            .take(6)
            .collect::<Vec<_>>()
            .join(" ");
        out.push_str(&format!(
            "\n[[allow]]\nname = {}\nsql = {}\n",
            toml::Value::String(format!("{tool}: {words}")),
            toml::Value::String(s.sql.clone())
        ));
    }
    out
}

/// A connection string with its password, if any, left out.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.split_once(':') {
                Some((u, _)) => format!("{}{u}:…{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=…"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}
