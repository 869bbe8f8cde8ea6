//! The extended query protocol: Parse, Bind, Execute, Close, and the FunctionCall fast path.

use std::collections::HashMap;

use super::analyze::Analysis;
use super::expect::{Effect, Expect, StmtInfo};
use super::refusal::{outcome, Refused, REFUSAL_SQL, REFUSAL_STATEMENT};
use super::{Action, GateContext, SessionState};
use crate::classify::session_cmd::protocol_name;
use crate::classify::{decode, Class};
use crate::gate::{decide, Decision, HeldStatus};
use crate::proxy::authz::Grant;
use crate::wire::build::{self, message};
use crate::wire::frame::cstr;
use crate::wire::reply::ErrorReply;

/// libpq's large-object fast-path functions (built-in OIDs), allowed over FunctionCall. lo_unlink (964) is
/// not among them.
const LARGE_OBJECT_OIDS: &[u32] = &[
    952,  // lo_open
    953,  // lo_close
    954,  // loread
    955,  // lowrite
    956,  // lo_lseek
    3170, // lo_lseek64
    958,  // lo_tell
    3171, // lo_tell64
    957,  // lo_creat
    715,  // lo_create
    1004, // lo_truncate
    3172, // lo_truncate64
];

impl SessionState {
    pub(super) fn on_parse(&mut self, ctx: &GateContext, body: &[u8]) -> Action {
        let Some((name, rest)) = cstr(body) else {
            return Action::Forward; // malformed: the server will say so
        };
        let Some((query, rest)) = cstr(rest) else {
            return Action::Forward;
        };
        let name = protocol_name(name);
        let push = |me: &mut Self, info: StmtInfo, refused: Option<ErrorReply>| {
            me.queue.push_back(Expect::Parse {
                batch: me.batch,
                name: name.clone(),
                info,
                refused,
            });
        };
        if ctx.disabled {
            push(self, StmtInfo::unknown(""), None);
            return Action::Forward;
        }
        let entry = ctx.cache.lookup(query, &self.lex, ctx.generation);
        if !entry.attention && !self.guarded(ctx, entry.max) {
            let info = StmtInfo {
                class: entry.max,
                statements: Vec::new(),
                effect: Effect::None,
                fetches: None,
            };
            push(self, info, None);
            return Action::Forward;
        }
        let mut local = HashMap::new();
        match self.analyze(ctx, query, &mut local) {
            Err(Refused::Mention) => {
                // Never forwarded: a Parse of invalid SQL makes the server fail here instead.
                let refusal = self.mention_refusal(ctx, query);
                push(self, StmtInfo::unknown(""), Some(refusal));
                Action::Replace(build::parse(&name, REFUSAL_SQL))
            }
            Err(Refused::Token(err)) => {
                push(self, StmtInfo::unknown(""), Some(err));
                Action::Replace(build::parse(&name, REFUSAL_SQL))
            }
            Err(Refused::Hold(info)) => {
                push(self, *info, None);
                Action::Forward
            }
            Ok(Analysis {
                mut info,
                effects,
                rewritten,
                allowed,
                ..
            }) => {
                // The Parse goes to the server; its Execute is judged on what is left.
                self.record_allowed(ctx, &allowed);
                // The statement's own fingerprints are what a token will have to list.
                if info.statements.is_empty() {
                    if let Ok(text) = decode(query, &self.lex) {
                        if let Ok(stmts) = ctx.cache.classifier().analyze(&text, &self.lex) {
                            info.statements = stmts
                                .iter()
                                .map(|s| (s.fingerprint(), s.text.to_string()))
                                .collect();
                        }
                    }
                }
                info.effect = effects.into_iter().next().unwrap_or(Effect::None);
                if let Effect::Prepare { .. } | Effect::Deallocate(_) | Effect::DiscardAll =
                    info.effect
                {
                    // SQL PREPARE/DEALLOCATE/DISCARD through the extended protocol: name tracking would need the
                    // server's confirmation of an inner statement; judge conservatively instead.
                    info.class = info.class.max(Class::Unparsed);
                    info.effect = Effect::None;
                }
                push(self, info, None);
                match rewritten {
                    Some(text) => {
                        Action::Replace(build::parse_with_types(&name, text.as_bytes(), rest))
                    }
                    None => Action::Forward,
                }
            }
        }
    }

    pub(super) fn on_bind(&mut self, body: &[u8]) -> Action {
        let Some((portal, rest)) = cstr(body) else {
            return Action::Forward;
        };
        let Some((stmt, _)) = cstr(rest) else {
            return Action::Forward;
        };
        let info = self.lookup_statement(&protocol_name(stmt), &HashMap::new());
        self.queue.push_back(Expect::Bind {
            batch: self.batch,
            portal: protocol_name(portal),
            info,
        });
        Action::Forward
    }

    pub(super) fn on_execute(&mut self, ctx: &GateContext, body: &[u8]) -> Action {
        let Some((portal, _)) = cstr(body) else {
            return Action::Forward;
        };
        let portal = protocol_name(portal);
        if ctx.disabled {
            self.queue.push_back(Expect::Execute {
                effect: Effect::None,
                refused: None,
                portal,
                reservations: Vec::new(),
            });
            return Action::Forward;
        }
        let mut info = self.lookup_portal(&portal);
        // A prepared SQL FETCH/MOVE runs the portal it names, which may have been bound after the Parse.
        if let Some(target) = info.fetches.take() {
            let bound = self.portals.contains_key(&target)
                || self
                    .queue
                    .iter()
                    .any(|e| matches!(e, Expect::Bind { portal: p, .. } if *p == target));
            if bound {
                let runs = self.lookup_portal(&target);
                if runs.class > info.class {
                    info.class = runs.class;
                    info.statements = runs.statements;
                }
            }
        }
        // Only a hold needs the SQL text; the pass path does no string work.
        let sql = |info: &StmtInfo| {
            info.statements
                .iter()
                .map(|(_, s)| s.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        let guarded = self.guarded(ctx, info.class);
        // A portal suspended by a row limit continues the use its first Execute reserved.
        let rebound = self.queue.iter().any(
            |e| matches!(e, Expect::Bind { portal: p, .. } | Expect::Close { kind: b'P', name: p, .. } if *p == portal),
        );
        let continued = if guarded && !rebound {
            self.suspended.remove(&portal)
        } else {
            None
        };
        let (reservations, denied) = match continued {
            Some(r) => (r, None),
            None => {
                let grants: Vec<Grant> = info
                    .statements
                    .iter()
                    .map(|(fingerprint, sql)| Grant {
                        index: 0,
                        fingerprint: fingerprint.clone(),
                        sql: sql.clone(),
                        token: self.token.clone(),
                    })
                    .collect();
                self.authorize(ctx, guarded, &grants, info.class)
            }
        };
        let decision = decide(guarded, ctx.mode, denied.is_none());
        ctx.metrics
            .statement(info.class, outcome(decision, &reservations));
        match decision {
            Decision::Refuse => {
                // Only a simple Query waits for an approval: say why this one did not.
                if self.rule.on_hold == crate::config::OnHold::Wait {
                    self.reuse_held = Some((
                        None,
                        "not waiting for an approval: sent with the extended protocol".into(),
                    ));
                }
                let err = self.hold(
                    ctx,
                    &sql(&info),
                    &info,
                    HeldStatus::Held,
                    denied.as_ref(),
                    None,
                );
                self.queue.push_back(Expect::Execute {
                    effect: Effect::None,
                    refused: Some(err),
                    portal,
                    reservations: Vec::new(),
                });
                Action::Replace(build::parse(REFUSAL_STATEMENT, REFUSAL_SQL))
            }
            d => {
                if d == Decision::Observe {
                    self.hold(
                        ctx,
                        &sql(&info),
                        &info,
                        HeldStatus::Observed,
                        denied.as_ref(),
                        None,
                    );
                }
                self.queue.push_back(Expect::Execute {
                    effect: info.effect,
                    refused: None,
                    portal,
                    reservations,
                });
                Action::Forward
            }
        }
    }

    pub(super) fn on_function_call(&mut self, ctx: &GateContext, body: &[u8]) -> Action {
        self.batch += 1;
        let Some(oid) = body.get(..4).and_then(|b| crate::wire::frame::be_u32(b, 0)) else {
            // Too short to name a function: the server rejects it as a protocol violation.
            self.queue.push_back(Expect::FunctionCall { refused: None });
            return Action::Forward;
        };
        if ctx.disabled || LARGE_OBJECT_OIDS.contains(&oid) {
            self.queue.push_back(Expect::FunctionCall { refused: None });
            return Action::Forward;
        }
        let text = format!("FunctionCall of function OID {oid}");
        let fp = crate::audit::hash_line(format!("functioncall {oid}").as_bytes());
        let info = StmtInfo {
            class: Class::Privileged,
            statements: vec![(fp, text.clone())],
            effect: Effect::None,
            fetches: None,
        };
        let decision = decide(self.guarded(ctx, Class::Privileged), ctx.mode, false);
        ctx.metrics
            .statement(Class::Privileged, outcome(decision, &[]));
        match decision {
            Decision::Refuse => {
                let err = self.hold(ctx, &text, &info, HeldStatus::Held, None, None);
                self.queue
                    .push_back(Expect::FunctionCall { refused: Some(err) });
                let mut b = body.to_vec();
                b[..4].copy_from_slice(&0u32.to_be_bytes());
                Action::Replace(message(b'F', &b))
            }
            d => {
                if d == Decision::Observe {
                    self.hold(ctx, &text, &info, HeldStatus::Observed, None, None);
                }
                self.queue.push_back(Expect::FunctionCall { refused: None });
                Action::Forward
            }
        }
    }

    // ---- backend --------------------------------------------------------------------------------

    pub(super) fn on_close(&mut self, body: &[u8]) -> Action {
        if let Some(name) = body.get(1..).and_then(cstr).map(|(n, _)| protocol_name(n)) {
            self.queue.push_back(Expect::Close {
                batch: self.batch,
                kind: body[0],
                name,
            });
        }
        Action::Forward
    }
}
