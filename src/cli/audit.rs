//! `stepgate audit verify|show`: the audit tool, with its renderers.

use std::path::PathBuf;
use std::process::ExitCode;

use super::check::CheckFormat;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum AuditCmd {
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
        /// A report for people, or one JSON object for machines.
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
        /// Only records of this event (held, token_set, authorized, executed, approved, allowed, …).
        #[arg(long)]
        event: Option<String>,
        /// RFC 3339 time, e.g. 2026-11-28T00:00:00Z.
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        since: Option<std::time::SystemTime>,
        /// Only records of this user.
        #[arg(long)]
        user: Option<String>,
        /// Only records of this database.
        #[arg(long)]
        database: Option<String>,
        /// Log files in chain order, or a state directory.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
    },
    /// Move a damaged part of the log aside so stepgate can start again; exit 0 (also when the chain is whole).
    #[command(after_help = "Example:\n  stepgate audit repair ./stepgate-state\n\n\
                            Everything from the first damaged line on is moved into damaged.<time>.bin in the \
                            state directory (nothing is deleted), the chain continues with a `repaired` record, \
                            and every token named in the moved bytes counts as entirely spent. Run it with \
                            stepgate stopped.")]
    Repair {
        /// The state directory.
        state_dir: PathBuf,
    },
}

pub fn run(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
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
        AuditCmd::Repair { state_dir } => {
            match stepgate::audit::repair::repair(&state_dir)? {
                None => println!("nothing to repair: the chain is whole"),
                Some(r) => println!(
                    "repaired: the log was damaged at {}; {} bytes moved to {}; a `repaired` record continues the chain",
                    r.damage,
                    r.bytes,
                    r.aside.display()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
