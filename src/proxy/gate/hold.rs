//! Held entries and the errors a client sees for them.

use super::expect::StmtInfo;
use super::refusal::{audit_unavailable, sanitize, REFUSAL_SQL};
use super::{Action, GateContext, SessionState};
use crate::classify::Class;
use crate::gate::HeldStatus;
use crate::proxy::authz::Denied;
use crate::wire::build;
use crate::wire::reply::ErrorReply;

impl SessionState {
    /// Records a held/observed entry; returns the error to send for a refusal.
    pub(super) fn hold(
        &mut self,
        ctx: &GateContext,
        sql: &str,
        info: &StmtInfo,
        status: HeldStatus,
        denied: Option<&Denied>,
        because: Option<&str>,
    ) -> ErrorReply {
        self.hold_entry(ctx, sql, info, status, denied, because).0
    }

    /// [`SessionState::hold`], and the held id when an entry was recorded (or reused).
    pub(super) fn hold_entry(
        &mut self,
        ctx: &GateContext,
        sql: &str,
        info: &StmtInfo,
        status: HeldStatus,
        denied: Option<&Denied>,
        because: Option<&str>,
    ) -> (ErrorReply, Option<String>) {
        // Set for this refusal only (never left for a later one).
        let reuse_held = self.reuse_held.take();
        if let Some(Denied::AuditUnavailable) = denied {
            return (audit_unavailable(), None);
        }
        let _log = self.span.enter();
        let why = denied.and_then(Denied::describe);
        let statements = if info.statements.is_empty() {
            vec![(String::new(), sql.to_string())]
        } else {
            info.statements.clone()
        };
        let mut reason = format!(
            "{} is guarded for database {:?}, user {:?}",
            info.class, self.session.database, self.session.user
        );
        if let Some(why) = &why {
            reason = format!("{reason}; {why}");
        }
        // A refusal after a wait reuses the entry the wait began with (its held id is in the NOTICE).
        // (Or a new entry whose message says why it did not wait.)
        let (reuse, note) = match reuse_held {
            Some((id, note)) => (id, Some(note)),
            None => (None, None),
        };
        let reused = reuse.and_then(|id| {
            ctx.registry.set_status(&id, status);
            ctx.registry.get(&id)
        });
        let recorded = match reused {
            Some(entry) => Ok(entry),
            None => ctx.registry.record(
                ctx.config.max_held_sql,
                &self.session,
                sql,
                statements,
                info.class,
                &reason,
                status,
            ),
        };
        match recorded {
            Ok(entry) => {
                let fps: Vec<&str> = entry
                    .fingerprints
                    .iter()
                    .map(String::as_str)
                    .filter(|f| !f.is_empty())
                    .collect();
                if status == HeldStatus::Observed {
                    tracing::warn!(held_id = %entry.id, class = %info.class, user = %self.session.user, database = %self.session.database, sql = %entry.sql, "would hold (observe mode)");
                } else if status == HeldStatus::Waiting {
                    tracing::warn!(held_id = %entry.id, class = %info.class, user = %self.session.user, database = %self.session.database, sql = %entry.sql, "statement held; waiting for an approval");
                } else if let Some(note) = &note {
                    tracing::warn!(held_id = %entry.id, "statement refused: {note}");
                } else {
                    tracing::warn!(held_id = %entry.id, class = %info.class, user = %self.session.user, database = %self.session.database, sql = %entry.sql, "statement held");
                }
                // The held id and the reason are in the primary message: many tools print nothing else
                // (knex, dbmate, sqlx). A statement PostgreSQL cannot parse reads like the typo it usually
                // is; a token that does not cover the statement says why.
                let mut head = format!(
                    "stepgate: statement held ({}), held id {}",
                    info.class, entry.id
                );
                if let Some(note) = &note {
                    head = format!("{head}; {note}");
                }
                let source = match &ctx.config_path {
                    Some(p) => format!("--config {}", shell_word(&p.display().to_string())),
                    None => format!(
                        "--state-dir {}",
                        shell_word(&ctx.config.state_dir.display().to_string())
                    ),
                };
                let id = Some(entry.id.clone());
                if status == HeldStatus::Waiting {
                    let notice = ErrorReply::notice(format!(
                        "{head}; waiting up to {} for an approval",
                        humantime::format_duration(self.rule.wait_timeout)
                    ))
                    .with_detail(format!(
                        "it runs once an approved token covers it, or fails when the wait ends; fingerprint {}",
                        if fps.is_empty() { "(none)".to_string() } else { fps.join(", ") },
                    ))
                    .with_hint(format!(
                        "stepgate token new {source} --held {id} | gpg --clearsign > {id}.asc && stepgate approve {console} {id}.asc",
                        console = match &ctx.config_path {
                            Some(_) => source.clone(),
                            None => {
                                let addr = ctx
                                    .config
                                    .admin
                                    .as_ref()
                                    .and_then(|a| a.listen.clone())
                                    .unwrap_or_else(|| ctx.config.listen.clone());
                                let (host, port) = addr.rsplit_once(':').unwrap_or((&addr, "5432"));
                                format!(
                                    "--console {}",
                                    shell_word(&format!("host={} port={port}", host.trim_matches(['[', ']'])))
                                )
                            }
                        },
                        id = entry.id
                    ));
                    return (notice, id);
                }
                let message = match because.and_then(|b| b.strip_prefix("PostgreSQL: ")) {
                    Some(parser) if info.class == Class::Unparsed => format!("{head}: {parser}"),
                    _ => match &why {
                        Some(w) => {
                            format!(
                                "{head}; not covered by {}",
                                w.split(" (").next().unwrap_or(w)
                            )
                        }
                        None => head,
                    },
                };
                let error = ErrorReply::error("42501", message)
                    .with_detail(format!(
                        "held id {}; fingerprint {}{}{}",
                        entry.id,
                        if fps.is_empty() { "(none)".to_string() } else { fps.join(", ") },
                        because.map(|b| format!("; {b}")).unwrap_or_default(),
                        why.as_deref().map(|w| format!("; {w}")).unwrap_or_default()
                    ))
                    .with_hint(format!(
                        "stepgate token new {source} --held {id} | gpg --clearsign, then SET stepgate.token = '<signed token>' and run the statement again (or SHOW HELD {id} in the stepgate console)",
                        id = entry.id
                    ));
                (error, id)
            }
            Err(e) => {
                ctx.metrics
                    .audit_write_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(error = %e, "audit log unavailable: guarded statement refused");
                (audit_unavailable(), None)
            }
        }
    }

    /// Refuses a statement that names a stepgate setting, and records a `refused` event. The record keeps
    /// only the start of the statement (redacted): such a statement may carry a token, a bearer secret.
    pub(super) fn mention_refusal(&self, ctx: &GateContext, sql: &[u8]) -> ErrorReply {
        let _log = self.span.enter();
        tracing::warn!("refused a statement that names a stepgate setting");
        if let Some(audit) = &ctx.audit {
            let start =
                crate::check::first_line(&String::from_utf8_lossy(&sql[..sql.len().min(400)]), 60);
            let event = crate::audit::AuditEvent::Refused {
                session: self.session.clone(),
                sql: crate::gate::redact(&start),
                reason: "it names a stepgate setting".into(),
            };
            if let Err(e) = audit.write(&event, false) {
                ctx.metrics
                    .audit_write_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(error = %e, "audit log write failed");
            }
        }
        ErrorReply::error("42501", "stepgate: statement refused: it names a stepgate setting")
            .with_detail("stepgate settings are changed only with SET stepgate.<name> = '…', RESET stepgate.<name> and SHOW stepgate.<name>; other spellings never reach the server")
    }

    pub(super) fn refuse_query(&mut self, refusal: ErrorReply) -> Action {
        self.expect_query(Vec::new(), Some(refusal), Vec::new());
        Action::Replace(build::query(REFUSAL_SQL))
    }

    pub(super) fn status_text(&self, ctx: &GateContext, settings: &[String]) -> String {
        let guard: Vec<&str> = self.rule.guard.iter().map(|c| c.as_str()).collect();
        let mut settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        settings.sort();
        sanitize(&format!(
            "mode={}; rule=database:{},user:{},guard:{},signatures:{}; unparsed_guarded={}; settings={}; {}",
            ctx.mode.as_str(),
            self.rule.database,
            self.rule.user,
            if guard.is_empty() { "-".to_string() } else { guard.join("+") },
            self.rule.signatures,
            !ctx.config.allow_unparsed,
            if settings.is_empty() { "-".to_string() } else { settings.join("+") },
            match &self.token {
                None => "token=none".to_string(),
                Some(t) => format!(
                    "token={}; signers={}; not_after={}; statements={}",
                    t.id(),
                    t.auth.signers.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join("+"),
                    humantime::format_rfc3339_seconds(t.auth.payload.not_after),
                    t.auth.payload.statements.len()
                ),
            }
        ))
    }
}

/// `word` as one shell word: as it is when it needs no quoting, else in single quotes.
fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,@=".contains(&b))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}
