//! Judging a query string: the class of each statement, what it changes in the session, the stepgate
//! statements to rewrite, and the grants a token must cover. Pure: no I/O but the token verification of a
//! `SET stepgate.token`.

use std::collections::HashMap;

use super::expect::{Effect, Expect, StmtInfo};
use super::refusal::{sanitize, Refused};
use super::{GateContext, SessionState};
use crate::classify::session_cmd::{
    embedded_execute, kind_of, plain_show_stepgate, sql_name, SessionCommand,
};
use crate::classify::{decode, split, Class};
use crate::proxy::authz::{rejection, Denied, Grant, Reservation};

/// What [`SessionState::analyze`] finds in a query string.
pub(super) struct Analysis {
    pub(super) info: StmtInfo,
    /// Why the most dangerous statement got its class (`DELETE without WHERE`, PostgreSQL's syntax error).
    pub(super) reason: Option<String>,
    pub(super) effects: Vec<Effect>,
    pub(super) rewritten: Option<String>,
    pub(super) grants: Vec<Grant>,
    /// Statements an `[[allow]]` entry lets pass: recorded (`allowed`) once the message goes to the server.
    pub(super) allowed: Vec<Allowed>,
}

/// A statement an `[[allow]]` entry matched.
pub(super) struct Allowed {
    entry: crate::config::allow::Allow,
    fingerprint: String,
    sql: String,
    class: Class,
}

impl SessionState {
    /// Records the statements `[[allow]]` entries let pass, for a message that is going to the server.
    pub(super) fn record_allowed(&self, ctx: &GateContext, allowed: &[Allowed]) {
        for a in allowed {
            ctx.record_allowed(&self.session, &a.entry, &a.fingerprint, &a.sql, a.class);
        }
    }
}

impl SessionState {
    /// Judges the statements of a query string. Returns (info of the whole message, effects per statement,
    /// rewritten SQL if a stepgate statement had to be rewritten), or the refusal to send.
    pub(super) fn analyze(
        &self,
        ctx: &GateContext,
        bytes: &[u8],
        local: &mut HashMap<Vec<u8>, Option<StmtInfo>>,
    ) -> Result<Analysis, Refused> {
        let unparsed = |what: &str| {
            Refused::Hold(Box::new(StmtInfo {
                class: Class::Unparsed,
                statements: vec![(String::new(), what.to_string())],
                effect: Effect::None,
                fetches: None,
            }))
        };
        let text =
            decode(bytes, &self.lex).map_err(|e| unparsed(&format!("unreadable query: {e}")))?;
        let stmts = ctx
            .cache
            .classifier()
            .analyze(&text, &self.lex)
            .map_err(|e| {
                unparsed(&format!(
                    "{}: {e}",
                    crate::gate::clip_bytes(bytes, ctx.config.max_held_sql)
                ))
            })?;
        let mut class = Class::Read;
        let mut guarded_statements = Vec::new();
        let mut effects = Vec::with_capacity(stmts.len());
        let mut rewrites: Vec<(usize, usize, String)> = Vec::new();
        let mut mention = false;
        // Settings as the statements of this string will see them (SET takes effect for what follows).
        let mut view: Vec<String> = self.stepgate.keys().cloned().collect();
        let mut view_token = self.token.clone();
        let mut grants: Vec<Grant> = Vec::new();
        let mut reason: Option<(Class, String)> = None;
        let mut fetches = None;
        let mut allowed = Vec::new();
        for s in &stmts {
            let index = effects.len();
            let mut c = s.verdict.class;
            let mut effect = Effect::None;
            // What PostgreSQL's parser rejected runs nothing and is judged `unparsed` whatever its first
            // words say; only a mention of a stepgate setting is still refused outright.
            let kind = match kind_of(&s.tokens) {
                SessionCommand::Mention => SessionCommand::Mention,
                // Any other spelling of a stepgate setting, as PostgreSQL decodes it (U&"…", E'\x73…' in
                // set_config, ALTER ROLE … SET …): refused, never forwarded. `SHOW stepgate.<name>` as
                // written is the one plain form that passes (the server holds only the token's id).
                SessionCommand::Plain if s.mentions_stepgate && !plain_show_stepgate(&s.tokens) => {
                    SessionCommand::Mention
                }
                _ if s.verdict.class == Class::Unparsed => SessionCommand::Plain,
                k => k,
            };
            match kind {
                SessionCommand::Mention => mention = true,
                SessionCommand::Set { name, .. } if name != "stepgate.token" => {
                    // A typo (`stepgate.tokn`) must not read as success: the session would go on thinking
                    // it had a token.
                    return Err(Refused::Token(
                        crate::wire::reply::ErrorReply::error(
                            "42704",
                            format!("stepgate: unrecognized stepgate setting \"{}\"", sanitize(&name)),
                        )
                        .with_hint(
                            "stepgate's settings are stepgate.token (SET, RESET, SHOW) and stepgate.status (SHOW)",
                        ),
                    ));
                }
                SessionCommand::Set { name, value } => {
                    c = Class::Session;
                    if !view.contains(&name) {
                        view.push(name.clone());
                    }
                    let (shown, token) = if name == "stepgate.token" {
                        // Verified now, so a bad token fails the SET itself; the server sees only its id.
                        let _log = self.span.enter();
                        let tok = ctx
                            .verify_token(value.as_bytes(), &self.session, &self.rule)
                            .map_err(|reason| Refused::Token(rejection(&reason, false)))?;
                        // The evidence comes first: no statement runs under a token whose record is not
                        // on disk.
                        if !ctx.record_token_set(&self.session, &tok) {
                            return Err(Refused::Token(super::refusal::audit_unavailable()));
                        }
                        view_token = Some(tok.clone());
                        (sanitize(tok.id()), Some(tok))
                    } else {
                        ("set".to_string(), None)
                    };
                    rewrites.push((
                        s.start,
                        s.start + s.text.len(),
                        format!("SET {name} = '{shown}'"),
                    ));
                    let value = if token.is_some() { shown } else { value };
                    effect = Effect::SetStepgate { name, value, token };
                }
                SessionCommand::Reset(name) => {
                    c = Class::Session;
                    match &name {
                        Some(n) => view.retain(|v| v != n),
                        None => view.clear(),
                    }
                    if name.as_deref().is_none_or(|n| n == "stepgate.token") {
                        view_token = None;
                    }
                    effect = Effect::ResetStepgate(name);
                }
                SessionCommand::ShowStatus => {
                    c = Class::Read;
                    rewrites.push((
                        s.start,
                        s.start + s.text.len(),
                        format!(
                            "SELECT '{}'::text AS \"stepgate.status\"",
                            self.status_text(ctx, &view)
                        ),
                    ));
                }
                SessionCommand::Prepare { name, inner_start } => {
                    let inner = &s.tokens[inner_start..];
                    let v = ctx.cache.classifier().judge(inner);
                    let inner_sql = &text[inner[0].start..s.start + s.text.len()];
                    let mut inner_class = v.class;
                    if let Some(n) = embedded_execute(inner) {
                        inner_class = inner_class.max(self.lookup_statement(&n, local).class);
                    }
                    let info = StmtInfo {
                        class: inner_class,
                        statements: vec![(split::fingerprint(inner), inner_sql.to_string())],
                        effect: Effect::None,
                        fetches: None,
                    };
                    c = Class::Session;
                    local.insert(name.clone(), Some(info.clone()));
                    effect = Effect::Prepare {
                        name,
                        info: Box::new(info),
                    };
                }
                SessionCommand::Execute { name } => {
                    // EXECUTE runs the prepared statement: a token has to list that statement.
                    let info = self.lookup_statement(&name, local);
                    if self.guarded(ctx, info.class) {
                        let listed = if self.prepared.contains_key(&name)
                            || local.get(&name).is_some_and(|v| v.is_some())
                        {
                            info.statements.clone()
                        } else {
                            // An unknown name: nothing to authorize but the EXECUTE itself.
                            vec![(s.fingerprint(), s.text.to_string())]
                        };
                        for (fingerprint, sql) in &listed {
                            grants.push(Grant {
                                index,
                                fingerprint: fingerprint.clone(),
                                sql: sql.clone(),
                                token: view_token.clone(),
                            });
                        }
                        guarded_statements.extend(listed);
                    }
                    class = class.max(info.class);
                    effects.push(Effect::None);
                    continue;
                }
                SessionCommand::Deallocate(name) => {
                    c = Class::Session;
                    match &name {
                        Some(n) => {
                            local.insert(n.clone(), None);
                        }
                        None => local.clear(),
                    }
                    effect = Effect::Deallocate(name);
                }
                SessionCommand::DiscardAll => {
                    c = Class::Session;
                    local.clear();
                    view.clear();
                    view_token = None;
                    effect = Effect::DiscardAll;
                }
                SessionCommand::Plain => {
                    if let Some(n) = embedded_execute(&s.tokens) {
                        c = c.max(self.lookup_statement(&n, local).class);
                    }
                    // SQL FETCH/MOVE on a portal bound by the protocol runs that portal's statement, as an
                    // Execute would: judged by it, and a token has to list it. (A cursor DECLAREd in SQL was
                    // judged by its query when it was declared.)
                    if let Some(portal) = s.fetch_portal.as_deref().map(str::as_bytes) {
                        let bound = self.portals.contains_key(portal)
                            || self.queue.iter().any(
                                |e| matches!(e, Expect::Bind { portal: p, .. } if p == portal),
                            );
                        if bound {
                            let info = self.lookup_portal(portal);
                            if self.guarded(ctx, info.class) {
                                for (fingerprint, sql) in &info.statements {
                                    grants.push(Grant {
                                        index,
                                        fingerprint: fingerprint.clone(),
                                        sql: sql.clone(),
                                        token: view_token.clone(),
                                    });
                                }
                                guarded_statements.extend(info.statements.clone());
                            }
                            class = class.max(info.class);
                            effects.push(Effect::None);
                            continue;
                        }
                        // Not bound yet: if this runs later as a prepared statement, its Execute looks again.
                        fetches = Some(sql_name(String::from_utf8_lossy(portal).into_owned()));
                    }
                }
            }
            // An `[[allow]]` entry for exactly this statement (never for one PostgreSQL's parser could not
            // read) lets it pass without a token; it is recorded as `allowed` once the message is forwarded.
            let allow = if c != Class::Unparsed && self.guarded(ctx, c) && !ctx.allow.is_empty() {
                let fingerprint = s.fingerprint();
                ctx.allow_for(&fingerprint, &self.session.database, &self.session.user)
                    .map(|entry| Allowed {
                        entry: entry.clone(),
                        fingerprint,
                        sql: s.text.to_string(),
                        class: c,
                    })
            } else {
                None
            };
            if let Some(a) = allow {
                allowed.push(a);
                class = class.max(Class::Read);
                effects.push(effect);
                continue;
            }
            if self.guarded(ctx, c) {
                if reason.as_ref().is_none_or(|(rc, _)| c > *rc) && c == s.verdict.class {
                    reason = Some((c, s.reason.clone()));
                }
                let fingerprint = s.fingerprint();
                grants.push(Grant {
                    index,
                    fingerprint: fingerprint.clone(),
                    // Only a grant under a token (the session's or an approved one) is ever authorized
                    // and recorded with its text: without one, a large statement is not copied for nothing.
                    sql: if view_token.is_some() || !ctx.approvals.is_empty() {
                        s.text.to_string()
                    } else {
                        String::new()
                    },
                    token: view_token.clone(),
                });
                // A statement PostgreSQL's parser never read (over the parse budget) can never be authorized:
                // only what its held entry keeps is copied. Any other keeps its whole text (a portal's
                // statements are authorized from it at Execute, and a rollback judged on it).
                let kept = if s.verdict.class == Class::Unparsed {
                    crate::gate::clip(s.text, ctx.config.max_held_sql).into_owned()
                } else {
                    s.text.to_string()
                };
                guarded_statements.push((fingerprint, kept));
            }
            class = class.max(c);
            effects.push(effect);
        }
        if mention {
            return Err(Refused::Mention);
        }
        let rewritten = if rewrites.is_empty() {
            None
        } else if let (std::borrow::Cow::Borrowed(orig), true) = (&text, text.len() == bytes.len())
        {
            // The offsets are offsets into the bytes as they came: safe to splice.
            let mut out = String::with_capacity(orig.len());
            let mut pos = 0;
            for (a, b, with) in rewrites {
                out.push_str(&orig[pos..a]);
                out.push_str(&with);
                pos = b;
            }
            out.push_str(&orig[pos..]);
            Some(out)
        } else {
            return Err(unparsed("a stepgate setting in a query that is not UTF-8"));
        };
        Ok(Analysis {
            reason: reason.map(|(_, r)| r),
            info: StmtInfo {
                class,
                statements: guarded_statements,
                effect: Effect::None,
                fetches,
            },
            effects,
            rewritten,
            grants,
            allowed,
        })
    }

    /// For a guarded message: reserve uses for its grants (see [`GateContext::authorize`]). Returns the
    /// reservations, or why it is not authorized.
    pub(super) fn authorize(
        &mut self,
        ctx: &GateContext,
        guarded: bool,
        grants: &[Grant],
        class: Class,
    ) -> (Vec<Reservation>, Option<Denied>) {
        if !guarded {
            return (Vec::new(), None);
        }
        if grants.iter().all(|g| g.token.is_none()) && ctx.approvals.is_empty() {
            return (Vec::new(), Some(Denied::NoToken));
        }
        let _log = self.span.enter();
        // In skip-until-Sync the message's entry is abandoned at once (its uses given back): its records are
        // written here, in order, rather than deferred.
        let deferred = if self.skip_until_sync {
            None
        } else {
            self.deferred.as_mut()
        };
        match ctx.authorize(&self.session, &self.rule, grants, class, deferred) {
            Ok(r) => (r, None),
            Err(d) => {
                if let Some(code) = d.code() {
                    ctx.metrics.token_rejected(code);
                }
                (Vec::new(), Some(d))
            }
        }
    }
}
