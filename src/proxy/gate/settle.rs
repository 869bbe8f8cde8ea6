//! The life of a reserved token use after the server answers: confirmed (`executed`) and settled with its
//! transaction, or given back (`released`) when the server did not run the statement.

use super::expect::{Effect, Expect};
use super::{GateContext, SessionState};
use crate::classify::Class;
use crate::proxy::authz::Reservation;
use crate::wire::frame::cstr;

impl SessionState {
    pub(super) fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::SetStepgate { name, value, token } => {
                if let Some(tok) = token {
                    // Its `token_set` record was written when the SET was judged.
                    self.token = Some(tok);
                }
                self.stepgate.insert(name, value);
            }
            Effect::ResetStepgate(Some(name)) => {
                if name == "stepgate.token" {
                    self.token = None;
                }
                self.stepgate.remove(&name);
            }
            Effect::ResetStepgate(None) => {
                self.token = None;
                self.stepgate.clear()
            }
            Effect::DiscardAll => {
                self.token = None;
                self.stepgate.clear();
                self.prepared.clear();
                self.portals.clear();
            }
            Effect::Deallocate(Some(name)) => {
                self.prepared.remove(&name);
            }
            Effect::Deallocate(None) => self.prepared.clear(),
            Effect::Prepare { name, info } => {
                self.prepared.insert(name, *info);
            }
        }
    }

    /// Confirms the reservations of a statement the server completed; their transaction's outcome follows.
    pub(super) fn confirm(
        &mut self,
        ctx: &GateContext,
        reservations: Vec<Reservation>,
        body: &[u8],
    ) {
        if reservations.is_empty() {
            return;
        }
        let _log = self.span.enter();
        let tag = cstr(body)
            .map(|(t, _)| String::from_utf8_lossy(t).into_owned())
            .unwrap_or_default();
        for mut r in reservations {
            ctx.executed(&self.session, &r, &tag);
            r.in_block = self.txn_in_block;
            self.outcome_pending.push(r);
        }
    }

    /// Records how the transaction of the authorized statements that ran in it ended. With `give_back` (the
    /// server itself reported the rollback: idle after an error or a ROLLBACK, and the transaction set no
    /// savepoint), the uses of `ddl` and `destructive` statements PostgreSQL runs transactionally, completed
    /// inside an explicit transaction block, are given back (`released`, reason `rolled_back`), so a migration that failed part-way can be retried with the
    /// same token. `privileged` and `unparsed` uses, and anything not provably undone, stay spent.
    pub(super) fn settle(&mut self, ctx: &GateContext, committed: bool, give_back: bool) {
        if self.outcome_pending.is_empty() {
            return;
        }
        let _log = self.span.enter();
        for r in std::mem::take(&mut self.outcome_pending) {
            ctx.outcome(&self.session, &r, committed);
            if give_back
                && !committed
                && r.in_block
                && matches!(r.class, Class::Ddl | Class::Destructive)
                && crate::classify::undone_by_rollback(&r.sql)
            {
                ctx.released(&self.session, &r, "rolled_back");
            }
        }
    }

    /// The session is over: a transaction still open is rolled back by the server — unless a COMMIT was on
    /// its way, so nothing is given back.
    pub fn on_session_end(&mut self, ctx: &GateContext) {
        let committed = self.txn_status == b'I' && !self.txn_failed;
        self.settle(ctx, committed, false);
    }

    /// Gives back the reservations of statements the server did not run.
    pub(super) fn release(&self, ctx: &GateContext, reservations: Vec<Reservation>, why: &str) {
        if reservations.is_empty() {
            return;
        }
        let _log = self.span.enter();
        for r in reservations {
            ctx.released(&self.session, &r, why);
        }
    }

    /// The server reported an error for the statements these reservations were for, so it may have begun
    /// running them. A use is given back only where PostgreSQL provably undid the statement: `ddl` and
    /// `destructive` statements that run transactionally (no CONCURRENTLY, no sequence functions, no
    /// database, tablespace or system commands), which an error rolls back. Every other use stays spent.
    pub(super) fn release_failed(
        &self,
        ctx: &GateContext,
        reservations: Vec<Reservation>,
        why: &str,
    ) {
        let (undone, spent): (Vec<_>, Vec<_>) = reservations.into_iter().partition(|r| {
            matches!(r.class, Class::Ddl | Class::Destructive)
                && crate::classify::undone_by_rollback(&r.sql)
        });
        self.release(ctx, undone, why);
        if !spent.is_empty() {
            let _log = self.span.enter();
            for r in spent {
                tracing::warn!(token_id = %r.token.id(), fingerprint = %r.fingerprint, class = %r.class, reason = why, "the server failed a statement that may have had effects before it failed: its use stays spent");
            }
        }
    }

    /// Releases what an expectation that will never be answered had reserved.
    pub(super) fn abandon(&self, ctx: &GateContext, e: Expect, why: &str) {
        match e {
            Expect::Query { reservations, .. } | Expect::Execute { reservations, .. } => {
                self.release(ctx, reservations, why)
            }
            _ => {}
        }
    }
}
