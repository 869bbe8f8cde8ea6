//! `stepgate approve`: sends a signed token to the console's `APPROVE` and prints what it now covers.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use stepgate::config::{Config, Overrides};

/// The console's connection settings: `--console` as given, else from the config's `[admin] listen` (or
/// `listen`), database `stepgate`, user `$PGUSER` (or `$USER`); the password from `$PGPASSWORD`.
fn console_config(
    console: Option<String>,
    config: Option<PathBuf>,
) -> Result<tokio_postgres::Config> {
    let mut cfg: tokio_postgres::Config = match console {
        Some(c) => c
            .parse()
            .with_context(|| format!("--console {c:?} is not a connection string or URL"))?,
        None => {
            let config = Config::load(config.as_deref(), &Overrides::default())?;
            let addr = config
                .admin
                .as_ref()
                .and_then(|a| a.listen.clone())
                .unwrap_or_else(|| config.listen.clone());
            let (host, port) = addr
                .rsplit_once(':')
                .ok_or_else(|| anyhow!("the console address {addr:?} is not host:port"))?;
            let mut c = tokio_postgres::Config::new();
            c.host(host.trim_matches(['[', ']']))
                .port(port.parse().with_context(|| format!("port of {addr:?}"))?)
                .dbname("stepgate");
            c
        }
    };
    if cfg.get_user().is_none() {
        let user = std::env::var("PGUSER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "postgres".into());
        cfg.user(&user);
    }
    if cfg.get_dbname().is_none() {
        cfg.dbname("stepgate");
    }
    if cfg.get_password().is_none() {
        if let Ok(p) = std::env::var("PGPASSWORD") {
            cfg.password(p);
        }
    }
    Ok(cfg)
}

pub async fn run(
    console: Option<String>,
    config: Option<PathBuf>,
    token: &str,
) -> Result<ExitCode> {
    let text = super::token_ops::read_input(Some(std::path::Path::new(token)))?;
    let text = String::from_utf8(text).map_err(|_| anyhow!("the token is not UTF-8 text"))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(anyhow!("no token given (a file, or - for standard input)"));
    }
    let cfg = console_config(console, config)?;
    let (client, connection) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .context("cannot reach the stepgate console")?;
    tokio::spawn(connection);
    // Dollar-quoted with a tag no armored token contains.
    let tag = "$stepgate_approve$";
    if text.contains(tag) {
        return Err(anyhow!("the token contains {tag}"));
    }
    match client
        .simple_query(&format!("APPROVE {tag}{text}{tag}"))
        .await
    {
        Ok(messages) => {
            for m in messages {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                    println!(
                        "{:<11}{}",
                        r.get(0).unwrap_or_default(),
                        r.get(1).unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => match e.as_db_error() {
            Some(db) => {
                eprintln!("stepgate approve: refused: {}", db.message());
                Ok(ExitCode::from(1))
            }
            None => Err(anyhow::Error::new(e).context("the console did not answer")),
        },
    }
}
