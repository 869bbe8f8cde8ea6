//! The `stepgate` command line. Thin by design: parse flags, load the config, call the library, print the
//! error chain and exit non-zero.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    Keys {
        #[arg(long, short = 'c', env = "STEPGATE_CONFIG")]
        config: Option<PathBuf>,
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

#[derive(Subcommand)]
enum TokenCmd {
    /// Print the payload to sign for guarded statements (only those the rule guards).
    #[command(after_help = "Examples:
  stepgate token new --held k3x9q2ab > drop.txt
                              stepgate token new --database app --file migrations/0042.sql --reason PROJ-142
                              stepgate token new --database app --sql 'DROP TABLE staging_orders' --ttl 10m

                            Then sign it: gpg --clearsign drop.txt (or stepgate token sign --key KEY.asc < drop.txt).")]
    New {
        /// The config (its state_dir, instance, rules and dangerous_functions apply).
        #[arg(long, short = 'c', env = "STEPGATE_CONFIG")]
        config: Option<PathBuf>,
        /// stepgate's state directory, where held statements are recorded [default: the config's].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Database the statements will run in [with --held: the held statement's].
        #[arg(long)]
        database: Option<String>,
        /// Restrict the token to this user [with --held: the held statement's user].
        #[arg(long)]
        user: Option<String>,
        /// How long the token stays valid.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Why (a ticket, a sentence); the signer reads it.
        #[arg(long)]
        reason: Option<String>,
        /// SQL file (`-` for standard input).
        #[arg(long, group = "source")]
        file: Option<String>,
        /// SQL text.
        #[arg(long, group = "source")]
        sql: Option<String>,
        /// A held statement's id (from the 42501 error or SHOW HELD).
        #[arg(long, group = "source")]
        held: Option<String>,
    },
    /// Cleartext-sign a payload (standard input) with one or more secret keys.
    #[command(after_help = "Example:
  stepgate token new --held k3x9q2ab | stepgate token sign --key alice.sec.asc > token.asc

                            A key protected by a passphrase reads it from STEPGATE_PASSPHRASE, else asks on the terminal.
                            GnuPG makes the same thing: gpg --clearsign.")]
    Sign {
        /// Secret key file (armored or binary); repeat for several signers.
        #[arg(long, required = true)]
        key: Vec<String>,
    },
    /// Combine tokens signed separately by several people over one payload.
    #[command(after_help = "Example:
  stepgate token merge alice.asc bob.asc > token.asc")]
    Merge {
        #[arg(required = true, num_args = 2..)]
        files: Vec<PathBuf>,
    },
    /// Who signed a token (standard input), what it covers, and whether it is valid now.
    Inspect {
        #[arg(long, short = 'c', env = "STEPGATE_CONFIG")]
        config: Option<PathBuf>,
        /// stepgate's state directory (to count used statements) [default: the config's].
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// The one-line base64 form of a token (standard input), for PGOPTIONS.
    #[command(after_help = "Example:
  PGOPTIONS=\"-c stepgate.token=$(stepgate token pack < token.asc)\" psql -f 0042.sql")]
    Pack,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Re-check the hash chain and every signed token; exit 0 intact, 1 broken (the first bad record named).
    #[command(
        after_help = "Examples:\n  stepgate audit verify --keyring keys/ state/\n  \
                            stepgate audit verify --expect-head 1042:sha256:9f2c… state/audit.*.jsonl state/audit.jsonl\n\n\
                            A directory stands for its audit files in chain order. Key validity is judged at each record's time."
    )]
    Verify {
        /// Public keys to re-verify tokens with (file or directory); without it signatures are not checked.
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// SEQ:HASH of a head recorded elsewhere (console, /metrics): the log must reach it unchanged.
        #[arg(long)]
        expect_head: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: CheckFormat,
        /// Log files in chain order, or a state directory.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
    },
    /// Print records as a table.
    #[command(
        after_help = "Example:\n  stepgate audit show --event authorized --since 2026-11-28T00:00:00Z state/"
    )]
    Show {
        #[arg(long)]
        event: Option<String>,
        /// RFC 3339 time, e.g. 2026-11-28T00:00:00Z.
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        since: Option<std::time::SystemTime>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        database: Option<String>,
        #[arg(required = true)]
        logs: Vec<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CheckFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stepgate: error: {e:#}");
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
                tokio::spawn(stop_on_signal(shutdown.clone()));
                tokio::spawn(reload_on_sighup(server.handle()));
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
        } => check(format, config, &database, &user, &files),
        Cmd::Token(cmd) => token(cmd),
        Cmd::Audit(cmd) => audit(cmd),
        Cmd::Keys { config } => {
            let config = Config::load(config.as_deref(), &Overrides::default())?;
            print!("{}", stepgate::token::cli::keys(&config)?);
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
            let result = runtime()?.block_on(stepgate::demo::run(stepgate::demo::DemoOptions {
                listen,
                check,
            }));
            match result {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) if check => {
                    eprintln!("stepgate demo --check failed: {e:#}");
                    Ok(ExitCode::from(1))
                }
                Err(e) => Err(e),
            }
        }
    }
}

fn audit(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    use stepgate::audit_tool;
    match cmd {
        AuditCmd::Verify {
            keyring,
            expect_head,
            format,
            logs,
        } => {
            let head = match expect_head.as_deref() {
                Some(h) => Some(audit_tool::parse_head(h).ok_or_else(|| {
                    anyhow::anyhow!("--expect-head {h:?} is not SEQ:sha256:<64 hex digits>")
                })?),
                None => None,
            };
            let ring = match &keyring {
                Some(p) => Some(audit_tool::keyring(p).map_err(|e| anyhow::anyhow!(e))?),
                None => None,
            };
            let files = audit_tool::expand(&logs);
            if files.is_empty() {
                anyhow::bail!("no audit log files in {logs:?}");
            }
            let report = audit_tool::verify(&files, ring.as_ref(), head.as_ref())
                .map_err(|e| anyhow::anyhow!(e))?;
            match format {
                CheckFormat::Text => println!("{}", audit_tool::render(&report)),
                CheckFormat::Json => println!("{}", serde_json::to_string(&report)?),
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        AuditCmd::Show {
            event,
            since,
            user,
            database,
            logs,
        } => {
            let files = audit_tool::expand(&logs);
            let filter = audit_tool::ShowFilter {
                event,
                since,
                user,
                database,
            };
            print!(
                "{}",
                audit_tool::show(&files, &filter).map_err(|e| anyhow::anyhow!(e))?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn token(cmd: TokenCmd) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    use stepgate::token::cli;
    let with_state = |config: Option<PathBuf>, state_dir: Option<PathBuf>| {
        let overrides = Overrides {
            state_dir,
            ..Overrides::default()
        };
        Config::load(config.as_deref(), &overrides)
    };
    match cmd {
        TokenCmd::New {
            config,
            state_dir,
            database,
            user,
            ttl,
            reason,
            file,
            sql,
            held,
        } => {
            let config = with_state(config, state_dir)?;
            let source = match (file, sql, held) {
                (Some(f), _, _) => cli::Source::File(f),
                (_, Some(s), _) => cli::Source::Sql(s),
                (_, _, Some(h)) => cli::Source::Held(h),
                _ => anyhow::bail!("say what to sign: --held ID, --file FILE or --sql SQL"),
            };
            let payload = cli::new_payload(
                &cli::NewToken {
                    config: &config,
                    database,
                    user,
                    ttl,
                    reason,
                    source,
                },
                std::time::SystemTime::now(),
            )?;
            print!("{payload}");
            Ok(ExitCode::SUCCESS)
        }
        TokenCmd::Sign { key } => {
            let payload = cli::read_input(None)?;
            let keys = cli::read_secret_keys(&key)?;
            let passphrase =
                if stepgate::token::signed::needs_passphrase(&keys, std::time::SystemTime::now()) {
                    match std::env::var("STEPGATE_PASSPHRASE") {
                        Ok(p) => Some(p),
                        Err(_) => Some(rpassword::prompt_password(
                            "passphrase for the signing key: ",
                        )?),
                    }
                } else {
                    None
                };
            let token = cli::sign(&payload, &keys, passphrase.as_deref())?;
            std::io::stdout().write_all(&token)?;
            Ok(ExitCode::SUCCESS)
        }
        TokenCmd::Merge { files } => {
            let inputs = files
                .iter()
                .map(|f| cli::read_input(Some(f)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            std::io::stdout().write_all(&cli::merge(&inputs)?)?;
            Ok(ExitCode::SUCCESS)
        }
        TokenCmd::Inspect { config, state_dir } => {
            let config = with_state(config, state_dir)?;
            let token = cli::read_input(None)?;
            let (report, ok) = cli::inspect(&token, &config)?;
            print!("{report}");
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        TokenCmd::Pack => {
            let token = cli::read_input(None)?;
            println!("{}", cli::pack(&token));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check(
    format: CheckFormat,
    config: Option<PathBuf>,
    database: &str,
    user: &str,
    files: &[String],
) -> anyhow::Result<ExitCode> {
    use std::io::Read;
    use stepgate::check::{check_text, read_source};
    let config = Config::load(config.as_deref(), &Overrides::default())?;
    let rule = config.rule_for(database, user);
    let classifier = stepgate::classify::Classifier::for_config(&config);
    let mut findings = Vec::new();
    // A file that cannot be read or decoded is an error for that file only: the others are still checked
    // and printed, and the exit status is 2.
    let mut failed = false;
    for file in files {
        let bytes = if file == "-" {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).map(|_| buf)
        } else {
            std::fs::read(file)
        };
        let text = match bytes {
            Err(e) => Err(format!("cannot read {file}: {e}")),
            Ok(b) => read_source(&b).map_err(|e| format!("{file}: {e}")),
        };
        match text {
            Ok(text) => findings.extend(check_text(file, &text, &config, &rule, &classifier)),
            Err(e) => {
                eprintln!("stepgate check: {e}");
                failed = true;
            }
        }
    }
    let code = if failed {
        ExitCode::from(2)
    } else if findings.iter().any(|f| f.guarded) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    };
    match print_findings(format, &findings) {
        // A closed pipe (`stepgate check … | head`) is not an error of ours.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(code),
        Err(e) => Err(e.into()),
        Ok(()) => Ok(code),
    }
}

fn print_findings(
    format: CheckFormat,
    findings: &[stepgate::check::Finding],
) -> std::io::Result<()> {
    use std::io::Write;
    use stepgate::check::first_line;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        CheckFormat::Json => {
            for f in findings {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(f).map_err(std::io::Error::other)?
                )?;
            }
        }
        CheckFormat::Text => {
            let loc: Vec<String> = findings
                .iter()
                .map(|f| format!("{}:{}", f.file, f.line))
                .collect();
            let w = loc.iter().map(|l| l.len()).max().unwrap_or(0).max(9);
            writeln!(
                out,
                "{:w$}  {:11}  {:7}  STATEMENT",
                "FILE:LINE", "CLASS", "GUARDED"
            )?;
            for (f, l) in findings.iter().zip(&loc) {
                let guarded = if f.guarded { "yes" } else { "no" };
                writeln!(
                    out,
                    "{l:w$}  {:11}  {guarded:7}  {}",
                    f.class.as_str(),
                    first_line(&f.sql, 80)
                )?;
            }
            let held = findings.iter().filter(|f| f.guarded).count();
            writeln!(out, "{} statements, {held} guarded", findings.len())?;
        }
    }
    out.flush()
}

/// Reloads the policy on every SIGHUP.
async fn reload_on_sighup(handle: stepgate::proxy::ServerHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config and the keyring");
        let _ = handle.reload();
    }
}

/// Cancels `token` on the first SIGTERM or SIGINT.
async fn stop_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    token.cancel();
}

/// `--mode`: the two modes, listed in `--help` and completed, parsed into the config's type.
fn mode_parser() -> impl clap::builder::TypedValueParser<Value = stepgate::gate::Mode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["enforce", "observe"])
        .map(|s| s.parse::<stepgate::gate::Mode>().unwrap_or_default())
}
