//! `stepgate token …` and `stepgate keys`: the library's token functions, with their output.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use stepgate::config::{Config, Overrides};

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Print the payload to sign for guarded statements (only those the rule guards).
    #[command(after_help = "Examples:\n  \
                            stepgate token new --config /etc/stepgate/stepgate.toml --held k3x9q2ab > drop.txt\n  \
                            stepgate token new --held k3x9q2ab --held 7dq0c1mz --file migrations/0042.sql\n  \
                            stepgate token new --session k3x9q2ab --reason PROJ-142\n  \
                            stepgate token new --database app --file migrations/0042.sql --reason PROJ-142\n  \
                            stepgate token new --database app --sql 'DROP TABLE staging_orders' --ttl 10m\n\n\
                            Then sign it: gpg --clearsign drop.txt (or stepgate token sign --key KEY.asc < drop.txt).\n\
                            Sources are listed in this order: --held, --session, then --file or --sql.")]
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
        /// SQL file (`-` for standard input); its guarded statements come after the held ones.
        #[arg(long, conflicts_with = "sql")]
        file: Option<String>,
        /// SQL text.
        #[arg(long)]
        sql: Option<String>,
        /// A held statement's id (from the 42501 error or SHOW HELD); repeat for several, in order.
        #[arg(long, value_name = "ID")]
        held: Vec<String>,
        /// Every statement still held in one session, in order: its number (session_id in stepgate's log
        /// and the audit log) or the held id of one of its statements. Comes after --held.
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// Refuse, rather than warn, when a statement is unparsed or a file has a `-- migrate:down` section.
        #[arg(long)]
        strict: bool,
    },
    /// Cleartext-sign a payload (standard input) with one or more secret keys.
    #[command(after_help = "Example:\n  \
                            stepgate token new --held k3x9q2ab | stepgate token sign --key alice.sec.asc > token.asc\n\n\
                            A key protected by a passphrase reads it from STEPGATE_PASSPHRASE, else asks on the terminal.\n\
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
        /// Two or more tokens over the same payload, each signed by one or more people.
        #[arg(required = true, num_args = 2..)]
        files: Vec<PathBuf>,
    },
    /// Who signed a token (standard input), what it covers, and whether it is valid now.
    #[command(after_help = "Example:\n  \
                            stepgate token inspect --config /etc/stepgate/stepgate.toml < token.asc\n\n\
                            Exit 0 when the token is valid now for its database and user, 1 when it is refused (the reason\n\
                            is printed: already_used, signature_too_old, unknown_signer …).")]
    Inspect {
        /// The config whose keyring, signers and rules judge the token.
        #[arg(long, short = 'c', env = "STEPGATE_CONFIG")]
        config: Option<PathBuf>,
        /// stepgate's state directory (to count used statements) [default: the config's].
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// The one-line form of a token (standard input), for PGOPTIONS: `deflate:` + base64 of it compressed.
    #[command(after_help = "Example:
  PGOPTIONS=\"-c stepgate.token=$(stepgate token pack < token.asc)\" psql -f 0042.sql")]
    Pack,
}

pub fn run(cmd: TokenCmd) -> anyhow::Result<ExitCode> {
    use super::token_ops as cli;
    use std::io::Write;
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
            session,
            strict,
        } => {
            let config = with_state(config, state_dir)?;
            let mut sources: Vec<cli::Source> = held.into_iter().map(cli::Source::Held).collect();
            sources.extend(session.map(cli::Source::Session));
            sources.extend(file.map(cli::Source::File));
            sources.extend(sql.map(cli::Source::Sql));
            let payload = cli::new_payload(
                &cli::NewToken {
                    config: &config,
                    database,
                    user,
                    ttl,
                    reason,
                    sources,
                },
                std::time::SystemTime::now(),
            )?;
            for w in &payload.warnings {
                eprintln!("stepgate token new: warning: {w}");
            }
            if strict && !payload.warnings.is_empty() {
                eprintln!("stepgate token new: refused (--strict): nothing printed");
                return Ok(ExitCode::from(1));
            }
            print!("{}", payload.text);
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
