//! What the `stepgate token …` and `stepgate keys` commands do (the binary's side; the token library is
//! `stepgate::token`): make a payload, sign it, merge signatures, inspect a token, pack it into one line, and list
//! the signers' keys.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use sequoia_openpgp::cert::CertParser;
use sequoia_openpgp::parse::Parse;
use sequoia_openpgp::Cert;

use stepgate::audit::AuditLog;
use stepgate::config::Config;
use stepgate::gate::Registry;
use stepgate::token::payload::{Payload, StatementGrant};
use stepgate::token::signed::{self, Keyring};
use stepgate::token::signers::signer_rows;
use stepgate::token::{Ledger, Policy};

/// Where the statements of a new token come from.
pub enum Source {
    File(String),
    Sql(String),
    /// A held entry's id, looked up in the state directory.
    Held(String),
    /// Every statement still held in one session: its number (`session_id` in the log and SHOW SESSIONS),
    /// or the id of one of its held entries.
    Session(String),
}

/// `stepgate token new`.
pub struct NewToken<'a> {
    pub config: &'a Config,
    pub database: Option<String>,
    pub user: Option<String>,
    pub ttl: Duration,
    pub reason: Option<String>,
    /// In order: held entries' statements first, then a file's or `--sql`'s.
    pub sources: Vec<Source>,
}

pub use stepgate::token::new_uuid;

/// The payload to sign, and warnings for the signer's attention (an `unparsed` statement, a down migration,
/// a validity the rule will not accept).
pub struct NewPayload {
    pub text: String,
    pub warnings: Vec<String>,
}

/// Makes the payload to sign: only the statements the rule for the database and user guards.
pub fn new_payload(o: &NewToken<'_>, now: SystemTime) -> Result<NewPayload> {
    let classifier = stepgate::classify::Classifier::for_config(o.config);
    let mut database: Option<String> = None;
    let mut user: Option<String> = o.user.clone();
    let mut statements: Vec<StatementGrant> = Vec::new();
    let mut warnings = Vec::new();
    fn same_database(database: &mut Option<String>, db: &str) -> Result<()> {
        match database {
            Some(d) if d != db => bail!(
                "the statements are for different databases ({d:?} and {db:?}): a token names one"
            ),
            _ => {
                *database = Some(db.to_string());
                Ok(())
            }
        }
    }
    if o.sources.is_empty() {
        bail!("say what to sign: --held ID (repeatable), --session ID, --file FILE or --sql SQL");
    }
    let mut held: Option<(Registry, Vec<serde_json::Value>)> = None;
    let path = o.config.state_dir.join("audit.jsonl");
    for source in &o.sources {
        match source {
            Source::Held(_) | Source::Session(_) => {
                let (registry, records) = match &mut held {
                    Some(h) => h,
                    None => {
                        let records = AuditLog::read_dir(&o.config.state_dir)?;
                        let r = Registry::new(None);
                        r.restore(&records);
                        held.insert((r, records))
                    }
                };
                let entry_of = |id: &str| {
                    registry.get(id).ok_or_else(|| {
                        anyhow!(
                            "no held statement {id:?} in {} (use --state-dir or --config to name stepgate's state directory)",
                            path.display()
                        )
                    })
                };
                let entries = match source {
                    Source::Held(id) => vec![entry_of(id)?],
                    Source::Session(s) => {
                        // Which session: by a held id of it, or by its number (the latest session with
                        // that number: logs written before numbers went on across restarts reuse them).
                        let named = match s.parse::<u64>() {
                            Ok(n) => records
                                .iter()
                                .rev()
                                .filter(|r| r["session_id"].as_u64() == Some(n))
                                .find_map(|r| r["held_id"].as_str().and_then(|id| registry.get(id)))
                                .ok_or_else(|| {
                                    anyhow!(
                                        "session {n} has no held statement in {}",
                                        path.display()
                                    )
                                })?,
                            Err(_) => entry_of(s)?,
                        };
                        let session = named.session.session_id;
                        // Same number, other user, database or client: another session (an older log).
                        let same = |e: &stepgate::gate::HeldEntry| {
                            e.session.user == named.session.user
                                && e.session.database == named.session.database
                                && e.session.client_addr == named.session.client_addr
                        };
                        // In the order they were held; what already ran with a token or was dismissed is
                        // not listed, and a statement held again (a retry) is listed once.
                        let mut seen = std::collections::HashSet::new();
                        let mut entries = Vec::new();
                        for r in records.iter().filter(|r| {
                            matches!(r["event"].as_str(), Some("held" | "observed"))
                                && r["session_id"].as_u64() == Some(session)
                        }) {
                            let Some(e) = r["held_id"].as_str().and_then(|id| registry.get(id))
                            else {
                                continue;
                            };
                            if !same(&e) {
                                continue;
                            }
                            if matches!(
                                e.status,
                                stepgate::gate::HeldStatus::Authorized
                                    | stepgate::gate::HeldStatus::Dismissed
                            ) {
                                continue;
                            }
                            if !seen.insert(e.fingerprints.clone()) {
                                warnings.push(format!(
                                    "held {} repeats an earlier statement of session {session} (a retry?): listed once",
                                    e.id
                                ));
                                continue;
                            }
                            entries.push(e);
                        }
                        if entries.is_empty() {
                            bail!(
                                "session {session} has no held statement left to sign in {}",
                                path.display()
                            );
                        }
                        entries
                    }
                    _ => unreachable!("matched above"),
                };
                for entry in entries {
                    let found = stepgate::token::held::statements_of(
                        &entry,
                        o.database.as_deref(),
                        &classifier,
                    )?;
                    same_database(&mut database, &entry.session.database)?;
                    if user.is_none() {
                        user = Some(entry.session.user.clone());
                    }
                    statements.extend(found);
                }
            }
            Source::File(_) | Source::Sql(_) => {
                let (name, text) = match source {
                    Source::File(f) if f == "-" => {
                        let mut buf = Vec::new();
                        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                        (
                            "-".to_string(),
                            stepgate::check::read_source(&buf)
                                .map_err(|e| anyhow!("stdin: {e}"))?,
                        )
                    }
                    Source::File(f) => {
                        let bytes = std::fs::read(f).with_context(|| format!("cannot read {f}"))?;
                        (
                            f.clone(),
                            stepgate::check::read_source(&bytes)
                                .map_err(|e| anyhow!("{f}: {e}"))?,
                        )
                    }
                    Source::Sql(s) => ("--sql".to_string(), s.clone()),
                    Source::Held(_) | Source::Session(_) => unreachable!("handled above"),
                };
                if let Some(line) = text.lines().position(|l| {
                    l.trim_start()
                        .to_ascii_lowercase()
                        .starts_with("-- migrate:down")
                }) {
                    warnings.push(format!(
                        "{name}:{}: a `-- migrate:down` section: its statements (the rollback) are in the payload too; cut them off unless the token is for the rollback",
                        line + 1
                    ));
                }
                let db = o
                    .database
                    .clone()
                    .or_else(|| database.clone())
                    .ok_or_else(|| {
                        anyhow!("--database is required with --file or --sql (a token names its database)")
                    })?;
                same_database(&mut database, &db)?;
                let rule = o.config.rule_for(&db, o.user.as_deref().unwrap_or("*"));
                let findings =
                    stepgate::check::check_text(&name, &text, o.config, &rule, &classifier);
                let before = statements.len();
                statements.extend(findings.into_iter().filter(|f| f.guarded).map(|f| {
                    StatementGrant {
                        fingerprint: f.fingerprint,
                        class: f.class,
                        sql: f.sql,
                    }
                }));
                if statements.len() == before {
                    bail!("nothing to sign: no statement in {name} is guarded for database {db:?}");
                }
            }
        }
    }
    let database = database.unwrap_or_default();
    for (i, s) in statements.iter().enumerate() {
        if s.class == stepgate::config::Class::Unparsed {
            let head: String = s.sql.split_whitespace().collect::<Vec<_>>().join(" ");
            warnings.push(format!(
                "statement {} is unparsed (PostgreSQL's parser cannot read it — tool output pasted by mistake?): {}",
                i + 1,
                head.chars().take(80).collect::<String>()
            ));
        }
    }
    let rule = o.config.rule_for(&database, user.as_deref().unwrap_or("*"));
    if o.ttl > rule.max_token_lifetime {
        bail!(
            "--ttl {} is longer than the {} the rule for database {:?}, user {:?} accepts (max_token_lifetime): the token could never be used",
            humantime::format_duration(o.ttl),
            humantime::format_duration(rule.max_token_lifetime),
            rule.database,
            rule.user
        );
    }
    let payload = Payload {
        id: new_uuid(),
        instance: o.config.instance.clone(),
        database,
        user,
        not_before: None,
        not_after: now + o.ttl,
        statements,
        reason: o.reason.clone(),
    };
    Ok(NewPayload {
        text: payload.render(),
        warnings,
    })
}

/// Reads secret keys (armored or binary; several per file allowed).
pub fn read_secret_keys(paths: &[String]) -> Result<Vec<Cert>> {
    let mut certs = Vec::new();
    for p in paths {
        let bytes = std::fs::read(p).with_context(|| format!("cannot read key {p}"))?;
        for c in CertParser::from_bytes(&bytes).map_err(|e| anyhow!("{p}: {e}"))? {
            let c = c.map_err(|e| anyhow!("{p}: {e}"))?;
            if !c.is_tsk() {
                bail!("{p}: {} holds no secret key", c.fingerprint());
            }
            certs.push(c);
        }
    }
    if certs.is_empty() {
        bail!("no secret key given (--key FILE)");
    }
    Ok(certs)
}

/// `stepgate token sign`: checks the payload parses, then cleartext-signs it with every key.
pub fn sign(payload: &[u8], keys: &[Cert], passphrase: Option<&str>) -> Result<Vec<u8>> {
    Payload::parse(payload)
        .map_err(|e| anyhow!("refusing to sign: not a stepgate payload: {e}"))?;
    signed::sign_cleartext_with(payload, keys, SystemTime::now(), passphrase)
        .map_err(|e| anyhow!(e))
}

/// One cleartext-signed message split into its parts.
struct Cleartext<'a> {
    hashes: Vec<&'a str>,
    /// The dash-escaped text as it appears between the headers and the signature.
    text: &'a str,
    signature: &'a str,
}

fn split_cleartext(s: &str) -> Option<Cleartext<'_>> {
    let s = s.trim();
    let rest = s.strip_prefix("-----BEGIN PGP SIGNED MESSAGE-----")?;
    let rest = rest
        .strip_prefix("\r\n")
        .or_else(|| rest.strip_prefix('\n'))?;
    let (headers, body) = rest
        .split_once("\n\n")
        .or_else(|| rest.split_once("\r\n\r\n"))?;
    let mut hashes = Vec::new();
    for line in headers.lines() {
        let v = line.trim().strip_prefix("Hash:")?;
        hashes.extend(v.split(',').map(str::trim));
    }
    let at = body.find("-----BEGIN PGP SIGNATURE-----")?;
    let signature = &body[at..];
    if signature.matches("-----BEGIN PGP").count() != 1 {
        return None;
    }
    Some(Cleartext {
        hashes,
        text: &body[..at],
        signature,
    })
}

/// `stepgate token merge`: signatures by several people over one payload, as one token. Cleartext-signed
/// inputs become one cleartext message carrying every signature (GnuPG verifies it); otherwise the signed
/// messages are concatenated (stepgate accepts that form too).
pub fn merge(inputs: &[Vec<u8>]) -> Result<Vec<u8>> {
    use sequoia_openpgp::armor;
    use std::io::{Read, Write};
    if inputs.len() < 2 {
        bail!("give at least two signed tokens to merge");
    }
    let texts: Vec<&str> = inputs
        .iter()
        .map(|b| std::str::from_utf8(b).unwrap_or(""))
        .collect();
    let parts: Option<Vec<Cleartext<'_>>> = texts.iter().map(|t| split_cleartext(t)).collect();
    let merged = match parts {
        Some(parts) => {
            let norm = |t: &str| t.replace("\r\n", "\n");
            if parts.iter().any(|p| norm(p.text) != norm(parts[0].text)) {
                bail!("the tokens sign different payloads");
            }
            let mut hashes: Vec<&str> = Vec::new();
            let mut sigs = Vec::new();
            for p in &parts {
                for h in &p.hashes {
                    if !hashes.contains(h) {
                        hashes.push(h);
                    }
                }
                let mut r = armor::Reader::from_bytes(
                    p.signature.as_bytes(),
                    armor::ReaderMode::Tolerant(Some(armor::Kind::Signature)),
                );
                r.read_to_end(&mut sigs)
                    .map_err(|e| anyhow!("unreadable signature block: {e}"))?;
            }
            let mut out = String::from("-----BEGIN PGP SIGNED MESSAGE-----\n");
            if !hashes.is_empty() {
                let _ = writeln!(out, "Hash: {}", hashes.join(","));
            }
            out.push('\n');
            out.push_str(&norm(parts[0].text));
            let mut w = armor::Writer::new(Vec::new(), armor::Kind::Signature)?;
            w.write_all(&sigs)?;
            let mut bytes = out.into_bytes();
            bytes.extend(w.finalize()?);
            bytes
        }
        None => {
            let mut out = Vec::new();
            for (b, t) in inputs.iter().zip(&texts) {
                if t.trim_start().starts_with("-----BEGIN PGP") {
                    out.extend_from_slice(t.trim().as_bytes());
                    out.push(b'\n');
                } else {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(b.trim_ascii())
                        .unwrap_or_else(|_| b.clone());
                    let mut w = armor::Writer::new(Vec::new(), armor::Kind::Message)?;
                    w.write_all(&raw)?;
                    out.extend(w.finalize()?);
                }
            }
            out
        }
    };
    // Every signature is checked later against the keyring; here only that the parts belong together.
    match signed::verify(&merged, &Keyring::default(), SystemTime::now()) {
        Ok(_) | Err(signed::SignatureError::UnknownKey) => Ok(merged),
        Err(e) => Err(anyhow!("cannot merge: {e}")),
    }
}

pub use stepgate::token::pack;

/// `stepgate token inspect`: a report, and whether the token would be accepted now.
pub fn inspect(token: &[u8], config: &Config) -> Result<(String, bool)> {
    let policy = Policy::load(config)?;
    let now = SystemTime::now();
    let mut out = String::new();
    let signed = match signed::verify(token, &policy.keyring, now) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(out, "INVALID: {} ({e})", e.code());
            return Ok((out, false));
        }
    };
    let payload = match Payload::parse(&signed.payload) {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(out, "INVALID: malformed ({e})");
            return Ok((out, false));
        }
    };
    let _ = writeln!(out, "token     {}", payload.id);
    if let Some(i) = &payload.instance {
        let _ = writeln!(out, "instance  {i}");
    }
    let _ = writeln!(out, "database  {}", payload.database);
    let _ = writeln!(
        out,
        "user      {}",
        payload.user.as_deref().unwrap_or("(any)")
    );
    if let Some(nb) = payload.not_before {
        let _ = writeln!(out, "not-before {}", humantime::format_rfc3339_seconds(nb));
    }
    let _ = writeln!(
        out,
        "not-after {}",
        humantime::format_rfc3339_seconds(payload.not_after)
    );
    if let Some(r) = &payload.reason {
        let _ = writeln!(out, "reason    {r}");
    }
    let _ = writeln!(out, "signed by:");
    for s in &signed.signers {
        let name = policy
            .signers
            .iter()
            .find(|p| p.fingerprint.eq_ignore_ascii_case(&s.fingerprint))
            .map(|p| format!("signer {:?}", p.name))
            .unwrap_or_else(|| "not a [[signer]]".into());
        let _ = writeln!(
            out,
            "  {}  {}  ({name}) at {}",
            s.fingerprint,
            s.user_id,
            humantime::format_rfc3339_seconds(s.signed_at)
        );
    }
    let ledger = Ledger::default();
    ledger.restore(&AuditLog::read_dir(&config.state_dir).unwrap_or_default());
    let _ = writeln!(out, "statements:");
    let mut used_up = None;
    for g in &payload.statements {
        let listed = payload
            .statements
            .iter()
            .filter(|x| x.fingerprint == g.fingerprint)
            .count() as u32;
        let spent = ledger.spent(&payload.id, &g.fingerprint);
        if spent >= listed {
            used_up.get_or_insert(g.fingerprint.clone());
        }
        let _ = writeln!(
            out,
            "  {} {:11} used {spent} of {listed}  {}",
            g.fingerprint,
            g.class.as_str(),
            g.sql
        );
    }
    let user = payload.user.clone().unwrap_or_else(|| "*".into());
    let rule = config.rule_for(&payload.database, &user);
    let verdict = policy.verify(
        token,
        &rule,
        &stepgate::classify::Classifier::for_config(config),
        &payload.database,
        &user,
        now,
    );
    let ok = match (verdict, used_up) {
        (Err(e), _) => {
            let _ = writeln!(out, "REFUSED: {} ({e})", e.code());
            false
        }
        (Ok(_), Some(fp)) => {
            let _ = writeln!(out, "REFUSED: already_used ({fp})");
            false
        }
        (Ok(a), None) => {
            let _ = writeln!(
                out,
                "VALID: {} of {} required signers, for database {:?}",
                a.signers.len(),
                rule.signatures,
                payload.database
            );
            true
        }
    };
    Ok((out, ok))
}

/// `stepgate keys`: every signer with its key's state, then keys in the keyring no signer names.
pub fn keys(config: &Config) -> Result<String> {
    let keyring = match &config.keyring {
        Some(p) => Keyring::load(p).map_err(|e| anyhow!("keyring: {e}"))?,
        None => Keyring::default(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:12} {:40}  {:8} {:20}  {:24} CLASSES / USER ID",
        "SIGNER", "FINGERPRINT", "STATE", "EXPIRES", "DATABASES"
    );
    for r in signer_rows(config, &keyring) {
        let _ = writeln!(
            out,
            "{:12} {:40}  {:8} {:20}  {:24} {}  {}",
            r.name, r.fingerprint, r.state, r.expires, r.databases, r.classes, r.user_id
        );
    }
    if config.keyring.is_none() {
        let _ = writeln!(out, "(no keyring configured)");
    }
    Ok(out)
}

/// Reads a whole file or standard input (`-`).
pub fn read_input(path: Option<&Path>) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    match path {
        Some(p) if p != Path::new("-") => {
            buf = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        }
        _ => {
            std::io::stdin().take(16 << 20).read_to_end(&mut buf)?;
        }
    }
    Ok(buf)
}
