//! The `stepgate` command line. Thin by design: parse flags, load the config, call the library, print the
//! error chain and exit non-zero.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;
use cli::audit::AuditCmd;
use cli::check::CheckFormat;
use cli::token::TokenCmd;
use stepgate::config::{Config, LogFormat, Overrides, UpstreamTls, DEFAULT_LISTEN};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "stepgate",
    version,
    about = "PostgreSQL proxy with step-up authentication for dangerous statements",
    long_about = "stepgate sits between PostgreSQL clients and the server. Clients connect to it exactly as \
                  they would to PostgreSQL; their traffic is relayed to the upstream server.",
    after_help = "Examples:\n  stepgate demo                       throwaway PostgreSQL + stepgate on 127.0.0.1:6432\n  \
                  stepgate serve --upstream 127.0.0.1:5432\n  stepgate serve --config /etc/stepgate/stepgate.toml"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy.
    #[command(
        after_help = "Examples:\n  stepgate serve --listen 127.0.0.1:6432 --upstream 127.0.0.1:5432\n  \
                            stepgate serve --config stepgate.toml --upstream db.internal:5432\n\n\
                            Flags override the config file; without --config, defaults and flags are used.\n\
                            SIGTERM or SIGINT stops accepting and lets sessions finish (shutdown_timeout).\n\
                            SIGHUP re-reads the config file and the keyring; a broken file is rejected and the old policy stays.\n\
                            Logs go to stderr; RUST_LOG=debug shows more."
    )]
    Serve {
        /// The TOML configuration file (relative paths inside it resolve against its folder).
        #[arg(long, short = 'c', env = "STEPGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Address to accept clients on [default: 127.0.0.1:6432].
        #[arg(long)]
        listen: Option<String>,
        /// The PostgreSQL server, host:port [default: 127.0.0.1:5432].
        #[arg(long)]
        upstream: Option<String>,
        /// Directory for stepgate's state [default: ./stepgate-state].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Public keys of the signers: an armored file or a directory of them (overrides `keyring`).
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// TLS to the upstream server [default: disable].
        #[arg(long, value_enum)]
        upstream_tls: Option<UpstreamTls>,
        /// Log format [default: text].
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
        /// enforce holds guarded statements; observe lets them run and records them [default: enforce].
        #[arg(long, value_parser = mode_parser())]
        mode: Option<stepgate::gate::Mode>,
        /// Run sessions on N workers (each a single-threaded runtime for startup, login and TLS, plus an
        /// epoll relay thread for plain-TCP sessions), connections handed out in turn; 0 = every session as
        /// an async task on one multi-threaded runtime instead [default: one per two CPUs, at least one].
        #[arg(long)]
        workers: Option<usize>,
        /// Classify and hold NOTHING, to measure the gate's own cost. Logs a warning and writes a
        /// `gate_disabled` audit record; deliberately not available in the config file.
        #[arg(long)]
        unsafe_no_gate: bool,
    },
    /// Classify SQL files as the gate would; exit 0 nothing guarded, 1 guarded found, 2 error.
    #[command(after_help = "Examples:\n  stepgate check migrations/*.sql\n  \
                            stepgate check --format json --config stepgate.toml --database prod migrations/0042.sql\n  \
                            echo 'select 1' | stepgate check -\n\n\
                            Files are split where psql sends them: at top-level ;, at \\g, \\gx, \\gset, \\gdesc, \\gexec,\n\
                            \\crosstabview and \\watch; \\; is a ; that does not send; COPY … FROM stdin data up to \\. is skipped.\n\
                            Other meta-command lines are not SQL; \\gexec and \\i/\\ir/\\include make a finding unparsed.\n\
                            --format json adds each statement's reason (the rule that gave its class).\n\
                            With --config, the rule for --database/--user and the dangerous_functions list apply.")]
    Check {
        /// Output format: a table for people, JSON Lines for machines.
        #[arg(long, value_enum, default_value = "text")]
        format: CheckFormat,
        /// Use this config's rules and dangerous_functions (default: built-in rule and list).
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Database the statements would run in (selects the rule).
        #[arg(long, default_value = "*")]
        database: String,
        /// User the statements would run as (selects the rule).
        #[arg(long, default_value = "*")]
        user: String,
        /// SQL files; `-` reads standard input.
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Make, sign, merge, inspect and pack step-up tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Verify or show the audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The signers, their key fingerprints, expiry and revocation state.
    #[command(
        after_help = "Example:\n  stepgate keys --config /etc/stepgate/stepgate.toml\n\n\
                            Reads the config's [[signer]] entries and its keyring; a signer without a key, an expired\n\
                            or revoked key is shown as such."
    )]
    Keys {
        /// The config whose [[signer]] entries and keyring are listed.
        #[arg(long, short = 'c', env = "STEPGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Dry-run a migration command: every guarded statement it sends, as a token payload to sign.
    #[command(after_help = "Examples:\n  \
                            stepgate plan --config stepgate.toml --database app -- alembic upgrade head > 0042.txt\n  \
                            stepgate plan -c stepgate.toml --database app --user migrator --schema-from \"$PROD_RO_URL\" -- dbmate migrate\n  \
                            stepgate plan -c stepgate.toml --database app -- sqlx migrate run --database-url {url}\n  \
                            stepgate plan --database app --preset golang-migrate -- migrate -path empty -database {url}?sslmode=disable up\n\n\
                            A throwaway PostgreSQL is started (needs initdb, postgres, psql; pg_dump with --schema-from),\n\
                            loaded with the target's schema (pg_dump --schema-only, read-only) or empty, and an observe-mode\n\
                            stepgate with this config's rules is put in front of it. The command runs with PGHOST, PGPORT,\n\
                            PGDATABASE, PGUSER and DATABASE_URL pointing there; {url}, {host} and {port} in its arguments\n\
                            are replaced. Its output goes to stderr; stdout is the payload, ready for gpg --clearsign.\n\
                            Exit: 0 (payload printed, or nothing to sign), the command's own code if it failed, 2 on error.")]
    Plan {
        /// The config whose rules, instance and [[allow]] entries apply.
        #[arg(long, short = 'c', env = "STEPGATE_CONFIG")]
        config: Option<PathBuf>,
        /// The database the migration will run in (the token names it).
        #[arg(long)]
        database: String,
        /// The user it will run as (the token names it; its rule applies) [default: any user].
        #[arg(long)]
        user: Option<String>,
        /// Load this database's schema first (pg_dump --schema-only; a libpq URL or connection string).
        #[arg(long)]
        schema_from: Option<String>,
        /// How long the token is valid once made (not-after).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30m")]
        ttl: std::time::Duration,
        /// Shown to the signer.
        #[arg(long)]
        reason: Option<String>,
        /// Print [[allow]] entries named after this tool instead of a payload: a preset for a tool's own
        /// bookkeeping, from a run with no migrations of yours (see README "Migration tools").
        #[arg(long, value_name = "TOOL")]
        preset: Option<String>,
        /// The migration command, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Hand a signed token to the running stepgate (its console's APPROVE): it then covers the statements
    /// it lists for any session of its database (and user), each use once, until its not-after.
    #[command(after_help = "Examples:\n  \
                            stepgate approve 0042.asc && alembic upgrade head\n  \
                            stepgate approve --config stepgate.toml 0042.asc\n  \
                            stepgate approve --console 'host=db-gw port=6432 user=dba dbname=stepgate' - < 0042.asc\n\n\
                            The console is the [admin] one (database `stepgate`, an admin user's password in PGPASSWORD).\n\
                            Without --console: STEPGATE_CONSOLE, else [admin] listen (or listen) of --config, user $PGUSER.\n\
                            Exit 0 approved; 1 refused (the reason is printed); 2 the console could not be reached.")]
    Approve {
        /// The console as a libpq connection string or URL.
        #[arg(long, env = "STEPGATE_CONSOLE")]
        console: Option<String>,
        /// Find the console from this config ([admin] listen, else listen).
        #[arg(long, short = 'c', env = "STEPGATE_CONFIG")]
        config: Option<PathBuf>,
        /// The signed token (`-`: standard input).
        #[arg(default_value = "-")]
        token: String,
    },
    /// Start a throwaway PostgreSQL with stepgate in front of it.
    #[command(
        after_help = "Needs the PostgreSQL server binaries (initdb, postgres) and psql.\n\n\
                            Examples:\n  stepgate demo            runs until Ctrl-C, then removes everything\n  \
                            stepgate demo --check    runs the walkthrough unattended; exit 0 when it all works"
    )]
    Demo {
        /// Run the walkthrough unattended and exit 0 (all steps passed) or 1.
        #[arg(long)]
        check: bool,
        /// Address for stepgate [default: 127.0.0.1:6432; with --check a free port].
        #[arg(long)]
        listen: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stepgate: error: {}", cli::report(&e));
            ExitCode::from(2)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Serve {
            config,
            listen,
            upstream,
            state_dir,
            keyring,
            upstream_tls,
            log_format,
            mode,
            workers,
            unsafe_no_gate,
        } => {
            let overrides = Overrides {
                listen,
                upstream,
                state_dir,
                upstream_tls,
                log_format,
                mode,
                keyring,
            };
            let config_path = config;
            let config = Config::load(config_path.as_deref(), &overrides)?;
            stepgate::logging::init(config.log_format);
            runtime()?.block_on(async move {
                let options = stepgate::proxy::ServeOptions {
                    unsafe_no_gate,
                    config_path,
                    overrides,
                    workers,
                    ..Default::default()
                };
                let server = stepgate::proxy::Server::bind_with(config, options).await?;
                let shutdown = CancellationToken::new();
                tokio::spawn(cli::serve::stop_on_signal(shutdown.clone()));
                tokio::spawn(cli::serve::reload_on_sighup(server.handle()));
                server.run(shutdown).await;
                Ok(ExitCode::SUCCESS)
            })
        }
        Cmd::Check {
            format,
            config,
            database,
            user,
            files,
        } => cli::check::run(format, config, &database, &user, &files),
        Cmd::Token(cmd) => cli::token::run(cmd),
        Cmd::Audit(cmd) => cli::audit::run(cmd),
        Cmd::Plan {
            config,
            database,
            user,
            schema_from,
            ttl,
            reason,
            preset,
            command,
        } => {
            // No log subscriber: the observe-mode stepgate's lines would bury the summary.
            runtime()?.block_on(cli::plan::run(cli::plan::PlanOptions {
                config,
                database,
                user,
                schema_from,
                ttl,
                reason,
                preset,
                command,
            }))
        }
        Cmd::Approve {
            console,
            config,
            token,
        } => runtime()?.block_on(cli::approve::run(console, config, &token)),
        Cmd::Keys { config } => {
            let config = Config::load(config.as_deref(), &Overrides::default())?;
            print!("{}", cli::token_ops::keys(&config)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo { check, listen } => {
            stepgate::logging::init(LogFormat::Text);
            let listen = listen.unwrap_or_else(|| {
                if check {
                    "127.0.0.1:0".into()
                } else {
                    DEFAULT_LISTEN.into()
                }
            });
            let result =
                runtime()?.block_on(cli::demo::run(cli::demo::DemoOptions { listen, check }));
            match result {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) if check => {
                    eprintln!("stepgate demo --check failed: {}", cli::report(&e));
                    Ok(ExitCode::from(1))
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// `--mode`: the two modes, listed in `--help` and completed, parsed into the config's type.
fn mode_parser() -> impl clap::builder::TypedValueParser<Value = stepgate::gate::Mode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["enforce", "observe"])
        .map(|s| s.parse::<stepgate::gate::Mode>().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every argument of every command says what it is, and every example in a `--help` starts two spaces in
    /// (a continuation line that kept its source indentation reads as garbage in a terminal).
    #[test]
    fn every_help_documents_its_arguments_with_aligned_examples() {
        fn walk(cmd: &clap::Command, path: &str) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_help().is_some() || arg.get_long_help().is_some(),
                    "{path}: argument {id} has no help"
                );
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(
                    !help.contains("[env:") && !help.contains("[default: 30m]"),
                    "{path}: {id} repeats what clap adds: {help}"
                );
            }
            if let Some(after) = cmd.get_after_help() {
                for line in after.to_string().lines() {
                    let indent = line.len() - line.trim_start().len();
                    assert!(indent <= 4, "{path}: misaligned help line {line:?}");
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        walk(&super::Cli::command(), "stepgate");
    }
}
