//! The DBA console: the virtual database `stepgate`, as pgbouncer's console is `pgbouncer`.
//!
//! `psql -h <stepgate> -p 6432 -U <admin> stepgate`. Only `[admin] users` get in, and only with a password
//! the upstream checked: stepgate relays the login to `[admin] auth_database` and admits the user only if the
//! upstream asked for a password (cleartext, md5 or SCRAM) and accepted it. A login the upstream lets in
//! without a challenge (trust, peer) is refused, because every login stepgate relays comes from stepgate's own
//! address. After the login the upstream connection is closed; stepgate answers every command itself, with
//! proper rows, over the simple and the extended protocol. Every command is audited (`admin_action`).
//! Tokens are never shown (their id and a hash only) and password literals stay redacted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

use super::reload::ServerHandle;
use super::shared::Shared;
use super::stream::ClientStream;
use super::upstream;
use crate::wire::build::message;
use crate::wire::frame::{self, cstr};
use crate::wire::reply::ErrorReply;
use crate::wire::startup::StartupMessage;

/// The console's database name.
pub const CONSOLE_DB: &str = "stepgate";

/// Largest message accepted from a console client or during the login relay.
const MAX_MESSAGE: usize = 64 * 1024;

/// Reads whole tagged messages from a stream, keeping what it read beyond them.
struct Reader<'a, S> {
    stream: &'a mut S,
    buf: BytesMut,
}

impl<S: AsyncRead + Unpin> Reader<'_, S> {
    async fn next(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if !(4..=MAX_MESSAGE).contains(&len) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("message length {len} out of range"),
                    ));
                }
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    let body = self.buf[5..1 + len].to_vec();
                    self.buf.advance(1 + len);
                    return Ok(Some((tag, body)));
                }
            }
            self.buf.reserve(4096);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// One result: columns (all text) and rows, and the command tag.
struct Table {
    columns: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    tag: String,
}

impl Table {
    fn new(columns: &[&'static str]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
            tag: String::new(),
        }
    }
}

fn row_description(columns: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(columns.len() as i16).to_be_bytes());
    for c in columns {
        b.extend_from_slice(c.as_bytes());
        b.push(0);
        b.extend_from_slice(&0i32.to_be_bytes()); // table oid
        b.extend_from_slice(&0i16.to_be_bytes()); // attribute number
        b.extend_from_slice(&25i32.to_be_bytes()); // text
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
    }
    message(b'T', &b)
}

fn data_row(values: &[String]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
        b.extend_from_slice(v.as_bytes());
    }
    message(b'D', &b)
}

fn cstring_message(tag: u8, text: &str) -> Vec<u8> {
    let mut b = text.as_bytes().to_vec();
    b.push(0);
    message(tag, &b)
}

/// A console command, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Help,
    ShowHeld(Option<String>),
    ShowAudit(usize),
    ShowSessions,
    ShowSigners,
    ShowStats,
    ShowConfig,
    Reload,
    Dismiss(String),
    Empty,
}

fn parse_command(text: &str) -> Result<Command, String> {
    let t = text.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = t.split_whitespace().collect();
    let up: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let up: Vec<&str> = up.iter().map(String::as_str).collect();
    let id_arg = |w: &str| -> Result<String, String> {
        let id = w.trim_matches('\'').to_ascii_lowercase();
        if id.len() == 8
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            Ok(id)
        } else {
            Err(format!("{w:?} is not a held id (8 characters of a-z0-9)"))
        }
    };
    Ok(match up.as_slice() {
        [] => Command::Empty,
        ["HELP"] => Command::Help,
        ["SHOW", "HELD"] => Command::ShowHeld(None),
        ["SHOW", "HELD", _] => Command::ShowHeld(Some(id_arg(words[2])?)),
        ["SHOW", "AUDIT"] => Command::ShowAudit(20),
        ["SHOW", "AUDIT", n] => Command::ShowAudit(
            n.parse()
                .map_err(|_| format!("{n:?} is not a number of records"))?,
        ),
        ["SHOW", "SESSIONS"] => Command::ShowSessions,
        ["SHOW", "SIGNERS"] => Command::ShowSigners,
        ["SHOW", "STATS"] => Command::ShowStats,
        ["SHOW", "CONFIG"] => Command::ShowConfig,
        ["RELOAD"] => Command::Reload,
        ["DISMISS", _] => Command::Dismiss(id_arg(words[1])?),
        _ => {
            return Err(format!(
                "unknown command {:?}; HELP lists the commands",
                words.iter().take(3).cloned().collect::<Vec<_>>().join(" ")
            ))
        }
    })
}

fn columns(cmd: &Command) -> &'static [&'static str] {
    match cmd {
        Command::Help => &["command", "what it does"],
        Command::ShowHeld(None) => &["id", "time", "status", "user", "database", "class", "sql"],
        Command::ShowHeld(Some(_)) | Command::ShowStats | Command::ShowConfig => {
            &["field", "value"]
        }
        Command::ShowAudit(_) => &[
            "seq",
            "time",
            "event",
            "user",
            "database",
            "reference",
            "detail",
        ],
        Command::ShowSessions => &[
            "session_id",
            "user",
            "database",
            "client_addr",
            "application_name",
            "tls",
            "connected",
        ],
        Command::ShowSigners => &[
            "name",
            "fingerprint",
            "state",
            "expires",
            "databases",
            "classes",
            "user_id",
        ],
        Command::Reload | Command::Dismiss(_) | Command::Empty => &[],
    }
}

const HELP: &[(&str, &str)] = &[
    ("SHOW HELD", "held statements, oldest first"),
    (
        "SHOW HELD <id>",
        "one held statement: full SQL, fingerprints, and the payload to sign",
    ),
    (
        "SHOW AUDIT [n]",
        "the last n audit records (default 20); tokens appear as id and hash only",
    ),
    ("SHOW SESSIONS", "client sessions open now"),
    (
        "SHOW SIGNERS",
        "signers, key fingerprints, expiry and revocation state",
    ),
    (
        "SHOW STATS",
        "counters and the audit head (seq:hash) to record elsewhere",
    ),
    ("SHOW CONFIG", "the configuration in force"),
    (
        "RELOAD",
        "re-read the config file and the keyring (as SIGHUP)",
    ),
    ("DISMISS <id>", "mark a held statement as dismissed"),
    ("HELP", "this list"),
];

/// The console session of one admin.
struct Console<'a> {
    shared: &'a Shared,
    handle: ServerHandle,
    user: String,
    client_addr: String,
}

impl Console<'_> {
    fn audit(&self, command: &str, outcome: &str, extra: &[(&str, Value)]) {
        let gate = self.shared.gate.load();
        if let Some(log) = &gate.audit {
            let mut f = Map::new();
            f.insert("user".into(), self.user.clone().into());
            f.insert("client_addr".into(), self.client_addr.clone().into());
            f.insert("command".into(), command.into());
            f.insert("outcome".into(), outcome.into());
            for (k, v) in extra {
                f.insert((*k).into(), v.clone());
            }
            if let Err(e) = log.append("admin_action", f, false) {
                warn!(error = %e, "audit log write failed");
            }
        }
    }

    fn run(&self, cmd: &Command, text: &str) -> Result<Table, String> {
        let gate = self.shared.gate.load();
        let mut t = Table::new(columns(cmd));
        match cmd {
            Command::Empty => {}
            Command::Help => {
                for (c, w) in HELP {
                    t.rows.push(vec![c.to_string(), w.to_string()]);
                }
            }
            Command::ShowHeld(None) => {
                for e in gate.registry.list() {
                    let status = serde_json::to_value(e.status)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    t.rows.push(vec![
                        e.id,
                        e.time,
                        status,
                        e.session.user,
                        e.session.database,
                        e.class.as_str().into(),
                        crate::check::first_line(&e.sql, 100),
                    ]);
                }
            }
            Command::ShowHeld(Some(id)) => {
                let e = gate
                    .registry
                    .get(id)
                    .ok_or_else(|| format!("no held statement {id}"))?;
                let status = serde_json::to_value(e.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let payload = crate::token::cli::new_payload(
                    &crate::token::cli::NewToken {
                        config: &gate.config,
                        database: None,
                        user: None,
                        ttl: std::time::Duration::from_secs(30 * 60),
                        reason: None,
                        source: crate::token::cli::Source::Held(id.clone()),
                    },
                    std::time::SystemTime::now(),
                )
                .unwrap_or_else(|e| format!("(no payload: {e})"));
                for (k, v) in [
                    ("id", e.id.clone()),
                    ("time", e.time.clone()),
                    ("status", status),
                    ("user", e.session.user.clone()),
                    ("database", e.session.database.clone()),
                    ("client_addr", e.session.client_addr.clone()),
                    ("application_name", e.session.application_name.clone()),
                    ("class", e.class.as_str().into()),
                    ("reason", e.reason.clone()),
                    ("sql", e.sql.clone()),
                    ("fingerprints", e.fingerprints.join("\n")),
                    ("payload to sign", payload),
                    (
                        "make a token",
                        format!("stepgate token new --held {id} | gpg --clearsign"),
                    ),
                ] {
                    t.rows.push(vec![k.into(), v]);
                }
            }
            Command::ShowAudit(n) => {
                let records = match &gate.audit {
                    Some(log) => {
                        crate::audit::AuditLog::read_dir(log.dir()).map_err(|e| e.to_string())?
                    }
                    None => Vec::new(),
                };
                let start = records.len().saturating_sub(*n);
                for r in &records[start..] {
                    let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                    let reference = [s("held_id"), s("token_id")]
                        .into_iter()
                        .filter(|x| !x.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ");
                    let mut detail: Vec<String> =
                        ["sql", "reason", "outcome", "command", "fingerprint"]
                            .iter()
                            .map(|k| s(k))
                            .filter(|x| !x.is_empty())
                            .collect();
                    if let Some(tok) = r["token"].as_str() {
                        // The token is evidence in the log, never shown: its hash stands for it.
                        detail.push(format!("token {}", crate::audit::hash_line(tok.as_bytes())));
                    }
                    t.rows.push(vec![
                        r["seq"].as_u64().unwrap_or(0).to_string(),
                        s("time"),
                        s("event"),
                        s("user"),
                        s("database"),
                        reference,
                        crate::gate::redact(&detail.join(" · ")),
                    ]);
                }
            }
            Command::ShowSessions => {
                let mut v: Vec<_> = self
                    .shared
                    .sessions
                    .iter()
                    .map(|e| (*e.key(), e.value().clone()))
                    .collect();
                v.sort_by_key(|(id, _)| *id);
                for (id, s) in v {
                    t.rows.push(vec![
                        id.to_string(),
                        s.user,
                        s.database,
                        s.client_addr,
                        s.application_name,
                        s.tls.to_string(),
                        s.connected,
                    ]);
                }
            }
            Command::ShowSigners => {
                for r in crate::token::cli::signer_rows(&gate.config, &gate.policy.keyring) {
                    t.rows.push(vec![
                        r.name,
                        r.fingerprint,
                        r.state,
                        r.expires,
                        r.databases,
                        r.classes,
                        r.user_id,
                    ]);
                }
            }
            Command::ShowStats => {
                use crate::classify::Class;
                use crate::metrics::Outcome;
                use std::sync::atomic::Ordering::Relaxed;
                let m = &gate.metrics;
                let sum =
                    |o: Outcome| -> u64 { Class::ALL.iter().map(|c| m.statements(*c, o)).sum() };
                let head = gate
                    .audit
                    .as_ref()
                    .map(|a| {
                        let (seq, hash) = a.head();
                        format!("{seq}:{hash}")
                    })
                    .unwrap_or_default();
                for (k, v) in [
                    ("sessions_open", m.sessions_open.load(Relaxed).to_string()),
                    ("sessions_total", m.sessions_total.load(Relaxed).to_string()),
                    ("statements_passed", sum(Outcome::Pass).to_string()),
                    ("statements_held", sum(Outcome::Held).to_string()),
                    ("statements_observed", sum(Outcome::Observed).to_string()),
                    (
                        "statements_authorized",
                        sum(Outcome::Authorized).to_string(),
                    ),
                    ("held_entries", gate.registry.len().to_string()),
                    (
                        "audit_write_failures",
                        m.audit_write_failures.load(Relaxed).to_string(),
                    ),
                    (
                        "upstream_connect_failures",
                        m.upstream_connect_failures.load(Relaxed).to_string(),
                    ),
                    ("policy_generation", gate.generation.to_string()),
                    ("audit_head", head),
                ] {
                    t.rows.push(vec![k.into(), v]);
                }
            }
            Command::ShowConfig => {
                let c = &gate.config;
                let rules = c
                    .rules
                    .iter()
                    .map(|r| {
                        format!(
                            "database={} user={} guard={} signatures={} max_token_lifetime={}",
                            r.database,
                            r.user,
                            r.guard
                                .iter()
                                .map(|g| g.as_str())
                                .collect::<Vec<_>>()
                                .join("+"),
                            r.signatures,
                            humantime::format_duration(r.max_token_lifetime)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                for (k, v) in [
                    (
                        "config_file",
                        self.shared
                            .options
                            .config_path
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "(flags only)".into()),
                    ),
                    ("listen", c.listen.clone()),
                    ("upstream", c.upstream.clone()),
                    (
                        "upstream_tls",
                        format!("{:?}", c.upstream_tls).to_lowercase(),
                    ),
                    ("state_dir", c.state_dir.display().to_string()),
                    ("mode", gate.mode.as_str().into()),
                    ("instance", c.instance.clone().unwrap_or_default()),
                    (
                        "keyring",
                        c.keyring
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                    ),
                    (
                        "signers",
                        c.signers
                            .iter()
                            .map(|s| s.name.clone())
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                    (
                        "rules",
                        if rules.is_empty() {
                            "(default: every database and user; ddl+destructive+privileged+unparsed; 1 signature; 1h)".into()
                        } else {
                            rules
                        },
                    ),
                    ("allow_unparsed", c.allow_unparsed.to_string()),
                    ("max_connections", c.max_connections.to_string()),
                    (
                        "metrics_listen",
                        c.metrics_listen.clone().unwrap_or_default(),
                    ),
                    (
                        "admin_users",
                        c.admin
                            .as_ref()
                            .map(|a| a.users.join(", "))
                            .unwrap_or_default(),
                    ),
                    (
                        "tls",
                        c.tls
                            .as_ref()
                            .map(|t| {
                                format!("cert {} (required: {})", t.cert.display(), t.required)
                            })
                            .unwrap_or_else(|| "off".into()),
                    ),
                ] {
                    t.rows.push(vec![k.into(), v]);
                }
            }
            Command::Reload => {
                let generation = self.handle.reload()?;
                t.tag = format!("RELOAD {generation}");
            }
            Command::Dismiss(id) => {
                if !gate.registry.dismiss(id) {
                    return Err(format!("no held statement {id}"));
                }
                t.tag = "DISMISS".into();
            }
        }
        if t.tag.is_empty() {
            t.tag = match cmd {
                Command::Empty => String::new(),
                _ => format!("SHOW {}", t.rows.len()),
            };
        }
        let extra: Vec<(&str, Value)> = match cmd {
            Command::Dismiss(id) | Command::ShowHeld(Some(id)) => {
                vec![("held_id", id.clone().into())]
            }
            _ => vec![],
        };
        if *cmd != Command::Empty {
            self.audit(text.trim(), "ok", &extra);
        }
        Ok(t)
    }
}

/// Writes a table's rows and its CommandComplete (the RowDescription is sent separately when asked).
fn rows_and_tag(out: &mut Vec<u8>, t: &Table) {
    for r in &t.rows {
        out.extend(data_row(r));
    }
    out.extend(cstring_message(b'C', &t.tag));
}

fn error_bytes(msg: String) -> Vec<u8> {
    ErrorReply::error("42601", format!("stepgate console: {msg}"))
        .to_bytes()
        .to_vec()
}

/// Runs a console connection from login to Terminate.
pub(crate) async fn run(
    shared: &Arc<Shared>,
    mut client: ClientStream,
    startup: StartupMessage,
    leftover: BytesMut,
    peer: SocketAddr,
) {
    let user = startup.user();
    let console = Console {
        shared,
        handle: ServerHandle::new(shared.clone()),
        user: user.clone(),
        client_addr: peer.ip().to_string(),
    };
    let Some(admin) = shared.config.admin.clone() else {
        let e = ErrorReply::fatal(
            "3D000",
            "stepgate: the console is not enabled (no [admin] users)",
        );
        super::stream::send_and_close(&mut client, &e).await;
        return;
    };
    if !admin.users.contains(&user) {
        console.audit("login", "refused: not an admin user", &[]);
        warn!(%user, "console login refused: not in [admin] users");
        let e = ErrorReply::fatal(
            "28000",
            format!("stepgate: user \"{user}\" may not open the stepgate console"),
        )
        .with_hint("[admin] users in stepgate.toml lists who may");
        super::stream::send_and_close(&mut client, &e).await;
        return;
    }
    match login(
        shared,
        &mut client,
        &startup,
        &leftover,
        &admin.auth_database,
    )
    .await
    {
        Ok(()) => {}
        Err(LoginError::Refused(e)) => {
            console.audit("login", &format!("refused: {}", e.message), &[]);
            warn!(%user, reason = e.message, "console login refused");
            super::stream::send_and_close(&mut client, &e).await;
            return;
        }
        Err(LoginError::Forwarded) => {
            console.audit("login", "refused by the upstream", &[]);
            let _ = client.shutdown().await;
            return;
        }
        Err(LoginError::Io) => return,
    }
    console.audit("login", "ok", &[]);
    info!(%user, "console session opened");
    let mut greeting = Vec::new();
    for (k, v) in [
        ("server_version", "15.0 (stepgate console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        let mut b = k.as_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
        greeting.extend(message(b'S', &b));
    }
    let mut key = [0u8; 8];
    key[..4].copy_from_slice(&(rand::random::<u32>() >> 1).to_be_bytes());
    key[4..].copy_from_slice(&rand::random::<i32>().to_be_bytes());
    greeting.extend(message(b'K', &key));
    greeting.extend(message(b'Z', b"I"));
    if client.write_all(&greeting).await.is_err() {
        return;
    }
    let _ = client.flush().await;
    let _ = serve_commands(&console, &mut client).await;
    info!(%user, "console session closed");
}

enum LoginError {
    /// stepgate refuses: send this.
    Refused(ErrorReply),
    /// The upstream's own error was forwarded.
    Forwarded,
    Io,
}

/// Relays the login to the upstream's `auth_database`; Ok only for a password login the upstream accepted.
async fn login(
    shared: &Shared,
    client: &mut ClientStream,
    startup: &StartupMessage,
    leftover: &BytesMut,
    auth_database: &str,
) -> Result<(), LoginError> {
    let mut up = match upstream::connect(shared, shared.config.startup_timeout).await {
        Ok(u) => u,
        Err(e) => {
            return Err(LoginError::Refused(ErrorReply::fatal(
                "08006",
                format!("stepgate: {e}"),
            )))
        }
    };
    let mut packet = startup.clone();
    packet.params.retain(|(k, _)| {
        k.as_slice() != b"database" && k.as_slice() != b"options" && k.as_slice() != b"replication"
    });
    packet
        .params
        .push((b"database".to_vec(), auth_database.as_bytes().to_vec()));
    packet.params.retain(|(k, _)| !k.starts_with(b"stepgate."));
    up.write_all(&packet.encode())
        .await
        .map_err(|_| LoginError::Io)?;
    let mut from_up = Reader {
        stream: &mut up,
        buf: BytesMut::new(),
    };
    let mut challenged = false;
    let mut client_buf = leftover.clone();
    loop {
        let Some((tag, body)) = from_up.next().await.map_err(|_| LoginError::Io)? else {
            return Err(LoginError::Refused(ErrorReply::fatal(
                "08006",
                "stepgate: the upstream closed the connection during the console login",
            )));
        };
        match tag {
            b'R' if body.len() >= 4 => {
                let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                let needs_answer = match code {
                    0 => {
                        let _ = from_up.stream.write_all(&message(b'X', &[])).await;
                        if !challenged {
                            return Err(LoginError::Refused(
                                ErrorReply::fatal(
                                    "28000",
                                    "stepgate: the console needs a password login, and the upstream let this user in without one",
                                )
                                .with_detail("trust and peer logins are not enough: every login stepgate relays comes from stepgate's own address")
                                .with_hint("give the admin role a password and a md5 or scram-sha-256 line in pg_hba.conf"),
                            ));
                        }
                        client
                            .write_all(&message(b'R', &0u32.to_be_bytes()))
                            .await
                            .map_err(|_| LoginError::Io)?;
                        return Ok(());
                    }
                    3 | 5 | 10 => {
                        challenged = true;
                        true
                    }
                    11 => true,
                    12 => false,
                    _ => {
                        return Err(LoginError::Refused(ErrorReply::fatal(
                            "28000",
                            format!(
                                "stepgate: the console cannot relay authentication method {code}"
                            ),
                        )))
                    }
                };
                let forwarded = if code == 10 {
                    // The client's TLS ends at stepgate: SCRAM channel binding cannot work, so do not offer it.
                    frame::sasl_without_channel_binding(&body)
                        .unwrap_or_else(|| message(b'R', &body))
                } else {
                    message(b'R', &body)
                };
                client
                    .write_all(&forwarded)
                    .await
                    .map_err(|_| LoginError::Io)?;
                client.flush().await.map_err(|_| LoginError::Io)?;
                if needs_answer {
                    let mut from_client = Reader {
                        stream: &mut *client,
                        buf: std::mem::take(&mut client_buf),
                    };
                    let answer = from_client.next().await.map_err(|_| LoginError::Io)?;
                    client_buf = from_client.buf;
                    match answer {
                        Some((b'p', b)) => from_up
                            .stream
                            .write_all(&message(b'p', &b))
                            .await
                            .map_err(|_| LoginError::Io)?,
                        _ => return Err(LoginError::Io),
                    }
                }
            }
            b'E' => {
                let _ = client.write_all(&message(b'E', &body)).await;
                let _ = client.flush().await;
                return Err(LoginError::Forwarded);
            }
            _ => {}
        }
    }
}

/// Describe and Close name a statement (`S`) or a portal (`P`).
fn kind_and_name(body: &[u8]) -> (u8, &[u8]) {
    let kind = body.first().copied().unwrap_or(b'S');
    let name = body.get(1..).and_then(cstr).map(|(n, _)| n).unwrap_or(b"");
    (kind, name)
}

/// A prepared console statement or a bound portal.
#[derive(Clone)]
struct Prepared {
    text: String,
    cmd: Command,
}

async fn serve_commands<S>(console: &Console<'_>, client: &mut S) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut statements: HashMap<Vec<u8>, Prepared> = HashMap::new();
    let mut portals: HashMap<Vec<u8>, Prepared> = HashMap::new();
    let mut skipping = false;
    let mut out: Vec<u8> = Vec::new();
    let mut reader = Reader {
        stream: client,
        buf: BytesMut::new(),
    };
    loop {
        if !out.is_empty() {
            reader.stream.write_all(&out).await?;
            reader.stream.flush().await?;
            out.clear();
        }
        let Some((tag, body)) = reader.next().await? else {
            return Ok(());
        };
        if skipping && tag != b'S' {
            continue;
        }
        match tag {
            b'X' => return Ok(()),
            b'Q' => {
                let text = String::from_utf8_lossy(cstr(&body).map(|(q, _)| q).unwrap_or(&body))
                    .into_owned();
                match parse_command(&text)
                    .and_then(|cmd| console.run(&cmd, &text).map(|t| (cmd, t)))
                {
                    Ok((Command::Empty, _)) => out.extend(message(b'I', &[])),
                    Ok((_, t)) => {
                        if !t.columns.is_empty() {
                            out.extend(row_description(&t.columns));
                        }
                        rows_and_tag(&mut out, &t);
                    }
                    Err(e) => {
                        console.audit(text.trim(), &format!("error: {e}"), &[]);
                        out.extend(error_bytes(e));
                    }
                }
                out.extend(message(b'Z', b"I"));
            }
            b'P' => {
                let (name, rest) = cstr(&body).unwrap_or((b"", b""));
                let text =
                    String::from_utf8_lossy(cstr(rest).map(|(q, _)| q).unwrap_or(b"")).into_owned();
                match parse_command(&text) {
                    Ok(cmd) => {
                        statements.insert(name.to_vec(), Prepared { text, cmd });
                        out.extend(message(b'1', &[]));
                    }
                    Err(e) => {
                        out.extend(error_bytes(e));
                        skipping = true;
                    }
                }
            }
            b'B' => {
                let (portal, rest) = cstr(&body).unwrap_or((b"", b""));
                let stmt = cstr(rest).map(|(s, _)| s).unwrap_or(b"");
                match statements.get(stmt) {
                    Some(p) => {
                        portals.insert(portal.to_vec(), p.clone());
                        out.extend(message(b'2', &[]));
                    }
                    None => {
                        out.extend(error_bytes("unknown prepared statement".into()));
                        skipping = true;
                    }
                }
            }
            b'D' => {
                let (kind, name) = kind_and_name(&body);
                let found = if kind == b'S' {
                    statements.get(name)
                } else {
                    portals.get(name)
                };
                match found {
                    Some(p) => {
                        if kind == b'S' {
                            out.extend(message(b't', &0i16.to_be_bytes()));
                        }
                        let cols = columns(&p.cmd);
                        if cols.is_empty() {
                            out.extend(message(b'n', &[]));
                        } else {
                            out.extend(row_description(cols));
                        }
                    }
                    None => {
                        out.extend(error_bytes("unknown statement or portal".into()));
                        skipping = true;
                    }
                }
            }
            b'E' => {
                let name = cstr(&body).map(|(n, _)| n).unwrap_or(b"");
                match portals.get(name).cloned() {
                    Some(p) => match console.run(&p.cmd, &p.text) {
                        Ok(t) if p.cmd == Command::Empty => {
                            let _ = t;
                            out.extend(message(b'I', &[]));
                        }
                        Ok(t) => rows_and_tag(&mut out, &t),
                        Err(e) => {
                            console.audit(p.text.trim(), &format!("error: {e}"), &[]);
                            out.extend(error_bytes(e));
                            skipping = true;
                        }
                    },
                    None => {
                        out.extend(error_bytes("unknown portal".into()));
                        skipping = true;
                    }
                }
            }
            b'C' => {
                let (kind, name) = kind_and_name(&body);
                if kind == b'S' {
                    statements.remove(name);
                } else {
                    portals.remove(name);
                }
                out.extend(message(b'3', &[]));
            }
            b'S' => {
                skipping = false;
                portals.remove(&b""[..]);
                out.extend(message(b'Z', b"I"));
            }
            b'H' => {}
            _ => {
                out.extend(error_bytes(format!(
                    "message type {:?} is not supported by the console",
                    tag as char
                )));
                out.extend(message(b'Z', b"I"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_case_insensitively() {
        assert_eq!(parse_command("show held;"), Ok(Command::ShowHeld(None)));
        assert_eq!(
            parse_command("SHOW HELD K3X9Q2AB"),
            Ok(Command::ShowHeld(Some("k3x9q2ab".into())))
        );
        assert_eq!(parse_command(" show audit 5 "), Ok(Command::ShowAudit(5)));
        assert_eq!(
            parse_command("dismiss 'abcd1234'"),
            Ok(Command::Dismiss("abcd1234".into()))
        );
        assert_eq!(parse_command(""), Ok(Command::Empty));
        assert!(parse_command("select 1").unwrap_err().contains("HELP"));
        assert!(parse_command("dismiss x").is_err());
    }
}
