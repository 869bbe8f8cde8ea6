//! Authorization of guarded statements by a session's token: verifying a token when it is set, reserving
//! uses durably before a statement is forwarded, and confirming or releasing them when the server answers.
//!
//! Every step is an audit record (DESIGN.md "Audit log"): `token_set`, `token_rejected`, `authorized`
//! (written and fsync'd before the statement is forwarded), `executed`, `released`.

use super::gate::context::GateContext;
use crate::audit::event::{AuditEvent, ReasonCode, Use};
use crate::classify::Class;
use crate::config::Rule;
use crate::gate::{redact, SessionFields};
use crate::token::grant::TokenRef;
use crate::token::{ActiveToken, Reason};
use crate::wire::reply::ErrorReply;

/// A guarded statement of a message and the token that would cover it.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Index of the statement in the message (which CommandComplete confirms it).
    pub index: usize,
    pub fingerprint: String,
    pub sql: String,
    pub token: Option<TokenRef>,
}

/// One reserved use.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub index: usize,
    pub token: TokenRef,
    pub fingerprint: String,
    pub sql: String,
    pub class: Class,
    /// The statement completed inside an explicit transaction block (BEGIN …): only there can nothing
    /// commit it before the block ends (a procedure's COMMIT is refused inside one), so only there may a
    /// rollback give its use back.
    pub in_block: bool,
}

/// Why a guarded message is not authorized.
#[derive(Debug, Clone)]
pub enum Denied {
    NoToken,
    /// The session's token no longer verifies (expired, key expired or revoked, policy changed).
    Token {
        id: String,
        reason: Reason,
    },
    NotListed {
        id: String,
        fingerprint: String,
    },
    AlreadyUsed {
        id: String,
        fingerprint: String,
    },
    AuditUnavailable,
}

impl Denied {
    /// The reason code, when a token was involved.
    pub fn code(&self) -> Option<ReasonCode> {
        match self {
            Denied::NoToken | Denied::AuditUnavailable => None,
            Denied::Token { reason, .. } => Some(reason.code()),
            Denied::NotListed { .. } => Some(ReasonCode::StatementNotListed),
            Denied::AlreadyUsed { .. } => Some(ReasonCode::AlreadyUsed),
        }
    }

    /// The reason code and what it concerns, for the DETAIL and the audit record.
    pub fn describe(&self) -> Option<String> {
        match self {
            Denied::NoToken | Denied::AuditUnavailable => None,
            Denied::Token { id, reason } => Some(format!("token {id}: {reason}")),
            Denied::NotListed { id, fingerprint } => {
                Some(format!("token {id}: statement_not_listed ({fingerprint})"))
            }
            Denied::AlreadyUsed { id, fingerprint } => {
                Some(format!("token {id}: already_used ({fingerprint})"))
            }
        }
    }
}

/// A short, non-reversible reference to a token for logs: its length and a hash prefix.
pub fn token_ref(raw: &[u8]) -> String {
    let h = crate::audit::hash_line(raw);
    format!("{} bytes, {}…", raw.len(), &h[..19])
}

impl GateContext {
    /// Appends an event built only when there is a log to write to.
    fn audit_with(&self, event: impl FnOnce() -> AuditEvent, sync: bool) -> bool {
        match &self.audit {
            None => true,
            Some(log) => {
                let event = event();
                match log.write(&event, sync) {
                    Ok(_) => true,
                    Err(e) => {
                        self.metrics
                            .audit_write_failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::error!(error = %e, event = event.name(), "audit log write failed");
                        false
                    }
                }
            }
        }
    }

    /// Verifies a token a session supplies; a refusal is audited as `token_rejected`.
    pub fn verify_token(
        &self,
        raw: &[u8],
        session: &SessionFields,
        rule: &Rule,
    ) -> Result<TokenRef, Reason> {
        let now = self.clock.now();
        let result = self.policy.verify(
            raw,
            rule,
            self.cache.classifier(),
            &session.database,
            &session.user,
            now,
        );
        match result {
            Ok(auth) => Ok(std::sync::Arc::new(ActiveToken::new(
                auth,
                raw.to_vec(),
                self.generation,
            ))),
            Err(reason) => {
                self.metrics.token_rejected(reason.code());
                tracing::warn!(user = %session.user, database = %session.database, code = %reason.code(), reason = %reason, token = %token_ref(raw), "token rejected");
                self.audit_with(
                    || AuditEvent::TokenRejected {
                        session: session.clone(),
                        reason: reason.code(),
                        detail: reason.to_string(),
                        token_sha256: crate::audit::hash_line(raw),
                    },
                    false,
                );
                Err(reason)
            }
        }
    }

    /// Records a verified token a session presents (the record keeps the token: it is the evidence), written
    /// before the SET or the login that carries it goes on, so it precedes every `authorized` record of that
    /// token in every spelling (the same query string, a pipeline, the startup packet). It is not fsync'd
    /// itself: the log is one append-only file (a rotated file is synced whole), so the fsync of the first
    /// `authorized` record that uses the token makes it durable too — and a login with a token costs its
    /// relay thread no disk wait. False if it could not be written: the token is then refused.
    pub fn record_token_set(&self, session: &SessionFields, token: &ActiveToken) -> bool {
        let written = self.audit_with(
            || AuditEvent::TokenSet {
                session: session.clone(),
                token_id: token.id().to_string(),
                signers: token.signers(),
                not_after: humantime::format_rfc3339_seconds(token.auth.payload.not_after)
                    .to_string(),
                token: String::from_utf8_lossy(&token.raw).into_owned(),
            },
            false,
        );
        if written {
            tracing::info!(user = %session.user, database = %session.database, token_id = token.id(), signers = token.auth.signers.len(), "token set");
        }
        written
    }

    /// Reserves one use for every grant, durably; all or nothing.
    ///
    /// With `deferred`, the `authorized` records are handed back there instead of written: the caller writes
    /// them with [`GateContext::write_durably`] (off the relay thread) before forwarding the statement, and
    /// gives the uses back if that fails.
    pub fn authorize(
        &self,
        session: &SessionFields,
        rule: &Rule,
        grants: &[Grant],
        class: Class,
        deferred: Option<&mut Vec<AuditEvent>>,
    ) -> Result<Vec<Reservation>, Denied> {
        if grants.is_empty() {
            return Err(Denied::NoToken);
        }
        let now = self.clock.now();
        let mut taken: Vec<Reservation> = Vec::with_capacity(grants.len());
        let undo = |taken: &[Reservation]| {
            for r in taken {
                self.ledger.release(r.token.id(), &r.fingerprint);
            }
        };
        for g in grants {
            let tok = match self.reserve_one(session, rule, g, now) {
                Ok(tok) => tok,
                Err(denied) => {
                    undo(&taken);
                    return Err(denied);
                }
            };
            taken.push(Reservation {
                index: g.index,
                token: tok,
                fingerprint: g.fingerprint.clone(),
                sql: g.sql.clone(),
                class,
                in_block: false,
            });
        }
        if let Some(out) = deferred {
            out.extend(
                taken
                    .iter()
                    .map(|r| AuditEvent::Authorized(self.use_of(session, r))),
            );
            return Ok(taken);
        }
        let last = taken.len() - 1;
        for (i, r) in taken.iter().enumerate() {
            if !self.audit_with(
                || AuditEvent::Authorized(self.use_of(session, r)),
                i == last,
            ) {
                undo(&taken);
                return Err(Denied::AuditUnavailable);
            }
        }
        for r in &taken {
            tracing::info!(user = %session.user, database = %session.database, token_id = r.token.id(), fingerprint = %r.fingerprint, "authorized");
        }
        Ok(taken)
    }

    /// Reserves one use for a grant: from the session's token if it covers the statement, else from the
    /// first approved token that does (re-verified for this session). The denial is the session token's,
    /// or NoToken.
    fn reserve_one(
        &self,
        session: &SessionFields,
        rule: &Rule,
        g: &Grant,
        now: std::time::SystemTime,
    ) -> Result<TokenRef, Denied> {
        let first = match &g.token {
            Some(tok) => match self.reserve_from(session, rule, tok, &g.fingerprint, now) {
                Ok(()) => return Ok(tok.clone()),
                Err(denied) => Some(denied),
            },
            None => None,
        };
        for tok in self
            .approvals
            .covering(&session.database, &session.user, &g.fingerprint, now)
        {
            if self
                .reserve_from(session, rule, &tok, &g.fingerprint, now)
                .is_ok()
            {
                return Ok(tok);
            }
        }
        Err(first.unwrap_or(Denied::NoToken))
    }

    /// One use of `fingerprint` from `tok`, if it verifies for this session, lists the statement and has a
    /// use left.
    fn reserve_from(
        &self,
        session: &SessionFields,
        rule: &Rule,
        tok: &TokenRef,
        fingerprint: &str,
        now: std::time::SystemTime,
    ) -> Result<(), Denied> {
        if !tok.is_current(self.generation, now) {
            if let Err(reason) = self.policy.verify(
                &tok.raw,
                rule,
                self.cache.classifier(),
                &session.database,
                &session.user,
                now,
            ) {
                return Err(Denied::Token {
                    id: tok.id().to_string(),
                    reason,
                });
            }
        }
        let Some(&limit) = tok.listed.get(fingerprint) else {
            return Err(Denied::NotListed {
                id: tok.id().to_string(),
                fingerprint: fingerprint.to_string(),
            });
        };
        if !self.ledger.reserve(tok.id(), fingerprint, limit) {
            return Err(Denied::AlreadyUsed {
                id: tok.id().to_string(),
                fingerprint: fingerprint.to_string(),
            });
        }
        Ok(())
    }

    /// Approves a signed token for every session it names (`stepgate approve`, the console's `APPROVE`):
    /// verified as a SET token would be for its database and user, recorded (`approved`, fsync'd, with the
    /// admin who handed it over), then usable. Its verification is redone for each session that uses it.
    pub fn approve(&self, raw: &[u8], admin: &str) -> Result<TokenRef, ApproveError> {
        let token = self.verify_approval(raw).map_err(ApproveError::Token)?;
        if self.approvals.list().iter().any(|t| t.id() == token.id()) {
            return Err(ApproveError::Already(token.id().to_string()));
        }
        let written = self.audit_with(
            || AuditEvent::Approved {
                user: admin.to_string(),
                token_id: token.id().to_string(),
                signers: token.signers(),
                token: String::from_utf8_lossy(raw).into_owned(),
            },
            true,
        );
        if !written {
            return Err(ApproveError::AuditUnavailable);
        }
        self.approvals.add(token.clone());
        tracing::info!(admin, token_id = token.id(), database = %token.auth.payload.database, statements = token.auth.payload.statements.len(), "token approved");
        Ok(token)
    }

    /// A token as an approval: verified for its own database and user (`*` when it names none) under the
    /// rule for them. Generation 0: never current, so every use re-verifies for the session that makes it.
    fn verify_approval(&self, raw: &[u8]) -> Result<TokenRef, Reason> {
        let now = self.clock.now();
        let signed = crate::token::signed::verify(raw, &self.policy.keyring, now)?;
        let payload = crate::token::Payload::parse(&signed.payload)?;
        let user = payload.user.clone().unwrap_or_else(|| "*".to_string());
        let rule = self.config.rule_for(&payload.database, &user);
        let auth = self.policy.verify(
            raw,
            &rule,
            self.cache.classifier(),
            &payload.database,
            &user,
            now,
        )?;
        Ok(std::sync::Arc::new(ActiveToken::new(auth, raw.to_vec(), 0)))
    }

    /// Approvals recorded before a restart (`approved` records): those that still verify are in force
    /// again; an expired one is dropped (its uses stay as the ledger says).
    pub fn restore_approvals(&self, raws: &[String]) {
        for raw in raws {
            match self.verify_approval(raw.as_bytes()) {
                Ok(token) => {
                    self.approvals.add(token);
                }
                Err(reason) => {
                    tracing::info!(code = %reason.code(), "an approved token no longer verifies and is dropped")
                }
            }
        }
    }

    /// Writes `events` in order, the last one fsync'd: the evidence a deferred authorization needs before
    /// its statement is forwarded. False if any write failed (counted and logged).
    pub fn write_durably(&self, events: &[AuditEvent]) -> bool {
        let last = events.len().saturating_sub(1);
        events
            .iter()
            .enumerate()
            .all(|(i, e)| self.audit_with(|| e.clone(), i == last))
    }

    /// Gives back uses reserved for records that were never written.
    pub fn unreserve(&self, reservations: &[Reservation]) {
        for r in reservations {
            self.ledger.release(r.token.id(), &r.fingerprint);
        }
    }

    fn use_of(&self, session: &SessionFields, r: &Reservation) -> Use {
        Use {
            session: session.clone(),
            sql: redact(&r.sql),
            fingerprint: r.fingerprint.clone(),
            class: r.class,
            token_id: r.token.id().to_string(),
            signers: r.token.signers(),
        }
    }

    /// The server ran an authorized statement.
    pub fn executed(&self, session: &SessionFields, r: &Reservation, command_tag: &str) {
        self.registry.authorized(&session.database, &r.fingerprint);
        self.audit_with(
            || AuditEvent::Executed {
                used: self.use_of(session, r),
                outcome: command_tag.to_string(),
            },
            false,
        );
    }

    /// How the transaction an authorized statement ran in ended (`committed` / `rolled_back`).
    pub fn outcome(&self, session: &SessionFields, r: &Reservation, committed: bool) {
        self.audit_with(
            || {
                let used = self.use_of(session, r);
                if committed {
                    AuditEvent::Committed(used)
                } else {
                    AuditEvent::RolledBack(used)
                }
            },
            false,
        );
    }

    /// The server refused an authorized statement: the use is given back.
    pub fn released(&self, session: &SessionFields, r: &Reservation, why: &str) {
        self.ledger.release(r.token.id(), &r.fingerprint);
        self.audit_with(
            || AuditEvent::Released {
                used: self.use_of(session, r),
                reason: why.to_string(),
            },
            false,
        );
    }
}

/// Why a token could not be approved.
#[derive(Debug, thiserror::Error)]
pub enum ApproveError {
    #[error("token rejected: {0}")]
    Token(Reason),
    #[error("token {0} is approved already")]
    Already(String),
    #[error("the audit log is unavailable: the approval cannot be recorded")]
    AuditUnavailable,
}

/// The error for a token that fails verification when it is set.
pub fn rejection(reason: &Reason, fatal: bool) -> ErrorReply {
    let msg = format!("stepgate: token rejected ({})", reason.code());
    let e = if fatal {
        ErrorReply::fatal("28000", msg)
    } else {
        ErrorReply::error("28000", msg)
    };
    e.with_detail(reason.to_string())
}
