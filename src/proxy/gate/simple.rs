//! The simple query protocol: one Query message, its statements judged together.

use std::collections::HashMap;

use super::analyze::Analysis;
use super::refusal::{outcome, Refused};
use super::{Action, GateContext, SessionState};
use crate::classify::Class;
use crate::gate::{decide, Decision, HeldStatus};
use crate::metrics::Outcome;
use crate::wire::build;

impl SessionState {
    pub(super) fn on_query(&mut self, ctx: &GateContext, body: &[u8]) -> Action {
        let bytes = body.strip_suffix(&[0]).unwrap_or(body);
        // Set only for a round of a wait (`on_hold = "wait"`), for this one decision.
        let waiting = self.waiting.take();
        if ctx.disabled {
            self.expect_query(Vec::new(), None, Vec::new());
            return Action::Forward;
        }
        let entry = ctx.cache.lookup(bytes, &self.lex, ctx.generation);
        if !entry.attention && !self.guarded(ctx, entry.max) {
            ctx.metrics.statement(entry.max, Outcome::Pass);
            self.expect_query(Vec::new(), None, Vec::new());
            return Action::Forward;
        }
        let mut local = HashMap::new();
        // The message's SQL, redacted, is only needed for a held entry.
        // Only the first `max_held_sql` bytes are ever copied.
        let sql = || crate::gate::clip_bytes(bytes, ctx.config.max_held_sql);
        let started = std::time::Instant::now();
        let analysis = self.analyze(ctx, bytes, &mut local);
        ctx.metrics.classified(started.elapsed());
        match analysis {
            Err(Refused::Mention) => {
                ctx.metrics.statement(Class::Privileged, Outcome::Held);
                self.refuse_query(self.mention_refusal(ctx, bytes))
            }
            Err(Refused::Token(err)) => {
                ctx.metrics.statement(Class::Session, Outcome::Held);
                self.refuse_query(err)
            }
            Err(Refused::Hold(info)) => {
                ctx.metrics.statement(info.class, Outcome::Held);
                let err = self.hold(ctx, &sql(), &info, HeldStatus::Held, None, None);
                self.refuse_query(err)
            }
            Ok(Analysis {
                info,
                reason,
                effects,
                rewritten,
                grants,
                allowed,
            }) => {
                let guarded = !info.statements.is_empty() || self.guarded(ctx, info.class);
                // The last round of a wait (timed out, dismissed, cancelled) refuses whatever has come
                // meanwhile: an approval that arrives with the cancel must not run it.
                let last_round = waiting.as_ref().is_some_and(|w| w.end.is_some());
                let (reservations, denied) = if last_round {
                    (Vec::new(), Some(crate::proxy::authz::Denied::NoToken))
                } else {
                    self.authorize(ctx, guarded, &grants, info.class)
                };
                let decision = if last_round {
                    Decision::Refuse
                } else {
                    decide(guarded, ctx.mode, denied.is_none())
                };
                let round = waiting.is_some();
                match decision {
                    Decision::Refuse => {
                        // A wait's rounds decide the same statement again: counted once.
                        if !round {
                            ctx.metrics.statement(info.class, Outcome::Held);
                        }
                        if let Some(action) = self.wait_instead(
                            ctx,
                            waiting,
                            rewritten.is_some(),
                            &sql(),
                            &info,
                            denied.as_ref(),
                            reason.as_deref(),
                        ) {
                            return action;
                        }
                        let err = self.hold(
                            ctx,
                            &sql(),
                            &info,
                            HeldStatus::Held,
                            denied.as_ref(),
                            reason.as_deref(),
                        );
                        return self.refuse_query(err);
                    }
                    Decision::Observe => {
                        ctx.metrics
                            .statement(info.class, outcome(decision, &reservations));
                        self.hold(
                            ctx,
                            &sql(),
                            &info,
                            HeldStatus::Observed,
                            denied.as_ref(),
                            reason.as_deref(),
                        );
                    }
                    Decision::Pass => {
                        ctx.metrics
                            .statement(info.class, outcome(decision, &reservations));
                    }
                }
                self.record_allowed(ctx, &allowed);
                self.expect_query(effects, None, reservations);
                match rewritten {
                    Some(text) => Action::Replace(build::query(text.as_bytes())),
                    None => Action::Forward,
                }
            }
        }
    }
}
