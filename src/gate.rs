//! The gate's decision and the held registry.
//!
//! [`decide`] is a pure function of the statement's class, whether the session's rule guards that class, the
//! mode, and the session's authorizations (none until tokens land): `Pass` or `Refuse`. A refused message
//! becomes one [`HeldEntry`] in the [`Registry`] (also appended to the audit log as a `held` event) so a
//! DBA can review it and a signer can authorize exactly that statement.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use serde::Serialize;
use serde_json::Value;

use crate::audit::{AuditEvent, AuditLog};
use crate::classify::lex::{self, Kind};
use crate::classify::Class;

/// The time, injected: the gate reads the wall clock only through this, so token expiry is tested by
/// moving a [`ManualClock`] instead of sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that stands still until moved (for tests).
#[derive(Debug)]
pub struct ManualClock(std::sync::Mutex<SystemTime>);

impl ManualClock {
    pub fn new(at: SystemTime) -> ManualClock {
        ManualClock(std::sync::Mutex::new(at))
    }

    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub use crate::config::Mode;

pub use crate::config::MAX_HELD_SQL;

/// A message's SQL as a held entry keeps it: redacted, cut to `max` bytes (saying how long it was), without
/// copying more than that.
pub fn clip_bytes(sql: &[u8], max: usize) -> String {
    if sql.len() <= max {
        return redact(&String::from_utf8_lossy(sql));
    }
    let head = String::from_utf8_lossy(&sql[..max]);
    format!(
        "{}… [{} bytes in all; the rest is not kept]",
        redact(&head),
        sql.len()
    )
}

/// `sql` cut to `max` bytes (at a character boundary), saying how long it was; text already cut (with room
/// for that note) is left as it is.
pub fn clip(sql: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if sql.len() <= max + 256 {
        return std::borrow::Cow::Borrowed(sql);
    }
    let mut end = max;
    while !sql.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{}… [{} bytes in all; the rest is not kept]",
        &sql[..end],
        sql.len()
    ))
}

/// What the gate does with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pass,
    /// Guarded and not authorized: hold it (enforce) …
    Refuse,
    /// … or let it run and record it (observe).
    Observe,
}

/// The decision for a message whose most dangerous statement has `class`.
pub fn decide(guarded: bool, mode: Mode, authorized: bool) -> Decision {
    match (guarded && !authorized, mode) {
        (false, _) => Decision::Pass,
        (true, Mode::Enforce) => Decision::Refuse,
        (true, Mode::Observe) => Decision::Observe,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeldStatus {
    Held,
    /// Held under `on_hold = "wait"`: its session waits for an approval that covers it.
    Waiting,
    Authorized,
    Observed,
    Dismissed,
}

pub use crate::audit::SessionFields;

/// One refused (or, in observe mode, observed) message.
#[derive(Debug, Clone, Serialize)]
pub struct HeldEntry {
    pub id: String,
    pub time: String,
    #[serde(flatten)]
    pub session: SessionFields,
    /// The message's SQL with password literals redacted.
    pub sql: String,
    /// Fingerprints of the statements that need authorization.
    pub fingerprints: Vec<String>,
    /// The statements that need authorization (redacted), in order.
    pub statements: Vec<String>,
    pub class: Class,
    pub reason: String,
    pub status: HeldStatus,
    #[serde(skip)]
    pub created: Option<SystemTime>,
}

/// Why a DISMISS did not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DismissError {
    NotFound,
    /// It ran (or is running) under a token or an approval.
    Authorized,
}

/// The held registry: bounded, entries expire; every entry is also written to the audit log.
pub struct Registry {
    entries: DashMap<String, HeldEntry>,
    capacity: usize,
    ttl: Duration,
    audit: Option<Arc<AuditLog>>,
}

impl Registry {
    pub fn new(audit: Option<Arc<AuditLog>>) -> Registry {
        Registry {
            entries: DashMap::new(),
            capacity: 10_000,
            ttl: Duration::from_secs(7 * 24 * 3600),
            audit,
        }
    }

    /// A fresh id: 8 characters of `[a-z0-9]`, not used by any entry in the registry.
    fn new_id(&self) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        loop {
            let id: String = (0..8)
                .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
                .collect();
            if !self.entries.contains_key(&id) {
                return id;
            }
        }
    }

    /// Records a held (or observed) message and returns its entry, its SQL cut to `max_sql` bytes. The
    /// audit record is written first; if that fails the error is returned and nothing is registered.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        max_sql: usize,
        session: &SessionFields,
        sql: &str,
        statements: Vec<(String, String)>,
        class: Class,
        reason: &str,
        status: HeldStatus,
    ) -> Result<HeldEntry, crate::audit::AuditError> {
        self.expire();
        let entry = HeldEntry {
            id: self.new_id(),
            time: crate::audit::now_rfc3339(),
            session: session.clone(),
            sql: redact(&clip(sql, max_sql)),
            fingerprints: statements.iter().map(|(fp, _)| fp.clone()).collect(),
            statements: statements
                .into_iter()
                .map(|(_, s)| redact(&clip(&s, max_sql)))
                .collect(),
            class,
            reason: reason.to_string(),
            status,
            created: Some(SystemTime::now()),
        };
        if let Some(audit) = &self.audit {
            let held = crate::audit::event::Held {
                session: entry.session.clone(),
                held_id: entry.id.clone(),
                sql: entry.sql.clone(),
                fingerprint: entry.fingerprints.first().cloned().unwrap_or_default(),
                fingerprints: entry.fingerprints.clone(),
                statements: entry.statements.clone(),
                class,
                reason: reason.to_string(),
            };
            let event = if status == HeldStatus::Observed {
                AuditEvent::Observed(held)
            } else {
                AuditEvent::Held(held)
            };
            audit.write(&event, false)?;
        }
        if self.entries.len() >= self.capacity {
            // The oldest entry goes, but not one whose session still waits on it (a DBA must be able to
            // see it and DISMISS it), unless every entry waits.
            let oldest = |waiting: bool| {
                self.entries
                    .iter()
                    .filter(|e| waiting || e.status != HeldStatus::Waiting)
                    .min_by_key(|e| e.created)
                    .map(|e| e.key().clone())
            };
            if let Some(oldest) = oldest(false).or_else(|| oldest(true)) {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(entry.id.clone(), entry.clone());
        Ok(entry)
    }

    fn expire(&self) {
        let ttl = self.ttl;
        self.entries.retain(|_, e| {
            e.created
                .and_then(|c| c.elapsed().ok())
                .is_none_or(|age| age < ttl)
        });
    }

    pub fn get(&self, id: &str) -> Option<HeldEntry> {
        self.entries.get(id).map(|e| e.clone())
    }

    /// All entries, oldest first.
    pub fn list(&self) -> Vec<HeldEntry> {
        let mut v: Vec<HeldEntry> = self.entries.iter().map(|e| e.clone()).collect();
        v.sort_by(|a, b| a.time.cmp(&b.time));
        v
    }

    /// Rebuilds the registry from audit records (`held` and `observed` events).
    pub fn restore(&self, records: &[Value]) {
        for r in records {
            let status = match r["event"].as_str() {
                Some("held") => HeldStatus::Held,
                Some("observed") => HeldStatus::Observed,
                Some("executed") => {
                    if let (Some(db), Some(fp)) =
                        (r["database"].as_str(), r["fingerprint"].as_str())
                    {
                        self.authorized(db, fp);
                    }
                    continue;
                }
                Some("admin_action") => {
                    // A console DISMISS stays dismissed across restarts.
                    let dismissed = r["outcome"] == "ok"
                        && r["command"]
                            .as_str()
                            .is_some_and(|c| c.to_ascii_uppercase().starts_with("DISMISS"));
                    if let (true, Some(id)) = (dismissed, r["held_id"].as_str()) {
                        let _ = self.dismiss(id);
                    }
                    continue;
                }
                _ => continue,
            };
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            let list = |k: &str| -> Vec<String> {
                r[k].as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let entry = HeldEntry {
                id: s("held_id"),
                time: s("time"),
                session: SessionFields {
                    user: s("user"),
                    database: s("database"),
                    client_addr: s("client_addr"),
                    application_name: s("application_name"),
                    session_id: r["session_id"].as_u64().unwrap_or(0),
                },
                sql: s("sql"),
                fingerprints: list("fingerprints"),
                statements: list("statements"),
                class: s("class").parse().unwrap_or(Class::Unparsed),
                reason: s("reason"),
                status,
                created: Some(SystemTime::now()),
            };
            if !entry.id.is_empty() {
                self.entries.insert(entry.id.clone(), entry);
            }
        }
    }

    /// Marks the held entries of `database` waiting for `fingerprint` as authorized: a token ran it.
    pub fn authorized(&self, database: &str, fingerprint: &str) {
        for mut e in self.entries.iter_mut() {
            if matches!(e.status, HeldStatus::Held | HeldStatus::Waiting)
                && e.session.database == database
                && e.fingerprints.iter().any(|f| f == fingerprint)
            {
                e.status = HeldStatus::Authorized;
            }
        }
    }

    /// A waiting entry whose statement an approval now covers becomes `authorized` (it is forwarded next);
    /// false if it was dismissed meanwhile — then it must not run. One step under the entry's lock, so a
    /// DISMISS either comes first (and the statement does not run) or finds it authorized and is refused.
    pub fn claim(&self, id: &str) -> bool {
        match self.entries.get_mut(id) {
            Some(e) if e.status == HeldStatus::Dismissed => false,
            Some(mut e) => {
                e.status = HeldStatus::Authorized;
                true
            }
            None => true,
        }
    }

    /// Sets the status of entry `id` (a wait that ended), unless it was dismissed meanwhile.
    pub fn set_status(&self, id: &str, status: HeldStatus) {
        if let Some(mut e) = self.entries.get_mut(id) {
            if e.status != HeldStatus::Dismissed {
                e.status = status;
            }
        }
    }

    /// Marks a held entry as dismissed (the console's DISMISS). An entry whose statement ran (or is being
    /// forwarded) under a token or an approval cannot be: a DISMISS that succeeds means it does not run.
    pub fn dismiss(&self, id: &str) -> Result<(), DismissError> {
        match self.entries.get_mut(id) {
            Some(e) if e.status == HeldStatus::Authorized => Err(DismissError::Authorized),
            Some(mut e) => {
                e.status = HeldStatus::Dismissed;
                Ok(())
            }
            None => Err(DismissError::NotFound),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The SQL with secrets replaced: password literals (`PASSWORD '…'`, also `ENCRYPTED PASSWORD`) and the
/// value of `SET stepgate.<name> = …` become `'********'`. Text that cannot be tokenized is cut at the first
/// `password` or `stepgate` word.
pub fn redact(sql: &str) -> String {
    let Ok(tokens) = lex::lex(sql, true) else {
        let lower = sql.to_ascii_lowercase();
        let cut = [lower.find("password"), lower.find("stepgate")]
            .into_iter()
            .flatten()
            .min();
        return match cut {
            Some(i) => format!("{}********", &sql[..i]),
            None => sql.to_string(),
        };
    };
    let mut out = String::with_capacity(sql.len());
    let mut mask_next = false;
    let sig: Vec<usize> = (0..tokens.len())
        .filter(|&i| !tokens[i].is_trivia())
        .collect();
    for (pos, &i) in sig.iter().enumerate() {
        let t = &tokens[i];
        // What precedes this token (whitespace and comments are copied as they are).
        let gap_from = if pos == 0 {
            0
        } else {
            let p = &tokens[sig[pos - 1]];
            p.start + p.text.len()
        };
        out.push_str(&sql[gap_from..t.start]);
        if mask_next
            && matches!(
                t.kind,
                Kind::String | Kind::Word | Kind::Number | Kind::QuotedIdent
            )
        {
            out.push_str("'********'");
            mask_next = false;
            continue;
        }
        mask_next = t.is_word("password")
            || ((t.text == "=" || t.is_word("to"))
                && pos >= 3
                && tokens[sig[pos - 3]]
                    .ident()
                    .is_some_and(|n| n.eq_ignore_ascii_case("stepgate"))
                && tokens[sig[pos - 2]].text == ".");
        out.push_str(t.text);
    }
    if let Some(&last) = sig.last() {
        let l = &tokens[last];
        out.push_str(&sql[l.start + l.text.len()..]);
    } else {
        out.push_str(sql);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        assert_eq!(decide(false, Mode::Enforce, false), Decision::Pass);
        assert_eq!(decide(true, Mode::Enforce, false), Decision::Refuse);
        assert_eq!(decide(true, Mode::Enforce, true), Decision::Pass);
        assert_eq!(decide(true, Mode::Observe, false), Decision::Observe);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("CREATE ROLE a LOGIN PASSWORD 'hunter2'"),
            "CREATE ROLE a LOGIN PASSWORD '********'"
        );
        assert_eq!(
            redact("alter user b with encrypted password $$x'y$$ valid until 'infinity'"),
            "alter user b with encrypted password '********' valid until 'infinity'"
        );
        assert_eq!(redact("select 'password'"), "select 'password'");
        assert_eq!(
            redact("SET stepgate.token = 'c2VjcmV0'; DROP TABLE t -- x"),
            "SET stepgate.token = '********'; DROP TABLE t -- x"
        );
        assert_eq!(
            redact("set stepgate.token to abc"),
            "set stepgate.token to '********'"
        );
        assert!(!redact("create role x password 'unterminated").contains("unterminated"));
    }

    #[test]
    fn ids_are_short_and_unique() {
        let r = Registry::new(None);
        let s = SessionFields::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            let e = r
                .record(
                    MAX_HELD_SQL,
                    &s,
                    "DROP TABLE t",
                    vec![("sha256:x".into(), "DROP TABLE t".into())],
                    Class::Destructive,
                    "guarded",
                    HeldStatus::Held,
                )
                .unwrap();
            assert_eq!(e.id.len(), 8);
            assert!(e
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
            assert!(seen.insert(e.id));
        }
    }

    /// A full registry drops its oldest entry, but not one a session still waits on: a flood of held
    /// statements must not take a waiting statement out of the DBA's sight (SHOW HELD, DISMISS).
    #[test]
    fn a_full_registry_keeps_the_entries_sessions_wait_on() {
        let mut r = Registry::new(None);
        r.capacity = 5;
        let s = SessionFields::default();
        let add = |status| {
            r.record(
                MAX_HELD_SQL,
                &s,
                "DROP TABLE t",
                vec![("sha256:x".into(), "DROP TABLE t".into())],
                Class::Destructive,
                "guarded",
                status,
            )
            .unwrap()
            .id
        };
        let waiting = add(HeldStatus::Waiting);
        let first_held = add(HeldStatus::Held);
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(1));
            add(HeldStatus::Held);
        }
        assert_eq!(r.len(), 5);
        assert!(r.get(&waiting).is_some(), "the waiting entry was dropped");
        assert!(r.get(&first_held).is_none());
    }
}
