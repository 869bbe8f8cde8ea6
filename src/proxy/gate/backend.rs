//! The server's answers: each is matched to the expected-response queue, confirms names and effects, and an
//! ErrorResponse that stepgate's own refusal caused is rewritten into stepgate's error.

use super::expect::{Effect, Expect};
use super::{Action, GateContext, SessionState};
use crate::wire::frame::cstr;
use crate::wire::reply::{error_fields, ErrorReply};

impl SessionState {
    /// CommandComplete or EmptyQueryResponse: the statement at the front of the queue finished.
    pub(super) fn on_backend_complete(
        &mut self,
        ctx: &GateContext,
        tag: u8,
        body: &[u8],
    ) -> Action {
        let (mine, effect) = match self.queue.front_mut() {
            Some(Expect::Execute { .. }) => match self.queue.pop_front() {
                Some(Expect::Execute {
                    effect,
                    reservations,
                    ..
                }) => (reservations, effect),
                _ => return Action::Forward,
            },
            Some(Expect::Query {
                effects,
                done,
                reservations,
                ..
            }) => {
                let index = *done;
                let effect = effects.get(index).cloned().unwrap_or(Effect::None);
                *done += 1;
                // The pass path has nothing reserved: no partition to build.
                let mine = if reservations.is_empty() {
                    Vec::new()
                } else {
                    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(reservations)
                        .into_iter()
                        .partition(|r| r.index == index);
                    *reservations = rest;
                    mine
                };
                (mine, effect)
            }
            _ => return Action::Forward,
        };
        if tag == b'C' {
            self.confirm(ctx, mine, body);
            self.apply(effect);
        } else {
            self.release(ctx, mine, "empty query");
        }
        Action::Forward
    }

    pub fn on_backend(&mut self, ctx: &GateContext, tag: u8, msg: &[u8]) -> Action {
        let body = msg.get(5..).unwrap_or(&[]);
        // A CopyEnd marker at the front was not preceded by a copy-in: the server ignored that CopyDone.
        while matches!(self.queue.front(), Some(Expect::CopyEnd)) {
            self.queue.pop_front();
        }
        if matches!(tag, b'C' | b'E' | b'Z') {
            // The copy ended (or failed): the server answers Syncs again.
            self.copy_in = false;
        }
        match tag {
            b'T' | b'n' => {
                // RowDescription/NoData answer a Describe; a simple Query's RowDescription belongs to it.
                self.pop_if(|e| matches!(e, Expect::Describe));
                return Action::Forward;
            }
            b'G' => {
                // CopyInResponse for the statement at the front: the server is in copy-in mode. Syncs the
                // client sent after that statement, up to its CopyDone/CopyFail, get no answer.
                let end = self.queue.iter().position(|e| matches!(e, Expect::CopyEnd));
                let upto = end.unwrap_or(self.queue.len());
                let mut i = 1;
                let mut limit = upto;
                while i < limit {
                    if matches!(self.queue.get(i), Some(Expect::Sync)) {
                        self.queue.remove(i);
                        limit -= 1;
                    } else {
                        i += 1;
                    }
                }
                match end {
                    Some(_) => {
                        self.queue.remove(limit);
                    }
                    None => self.copy_in = true,
                }
                return Action::Forward;
            }
            b'1' => {
                if let Some(Expect::Parse { name, info, .. }) =
                    self.pop_if(|e| matches!(e, Expect::Parse { .. }))
                {
                    self.prepared.insert(name, info);
                }
            }
            b'2' => {
                if let Some(Expect::Bind { portal, info, .. }) =
                    self.pop_if(|e| matches!(e, Expect::Bind { .. }))
                {
                    self.suspended.remove(&portal);
                    self.portals.insert(portal, info);
                }
            }
            b'3' => {
                if let Some(Expect::Close { kind, name, .. }) =
                    self.pop_if(|e| matches!(e, Expect::Close { .. }))
                {
                    if kind == b'S' {
                        self.prepared.remove(&name);
                    } else {
                        self.suspended.remove(&name);
                        self.portals.remove(&name);
                    }
                }
            }
            b'C' if body.starts_with(b"ROLLBACK\0") => {
                self.txn_failed = true;
                // The block is over (or was rolled back to a savepoint: then nothing is given back anyway);
                // what follows in the same string runs outside it until a BEGIN or a `T` says otherwise.
                self.txn_in_block = false;
                return self.on_backend_complete(ctx, tag, body);
            }
            b'C' if body.starts_with(b"COMMIT\0") => {
                // The transaction committed here (a COMMIT of a failed one answers ROLLBACK), whatever
                // happens later in the same query string.
                let action = self.on_backend_complete(ctx, tag, body);
                self.settle(ctx, true, false);
                self.txn_in_block = false;
                return action;
            }
            b'C' if body.starts_with(b"BEGIN\0") || body.starts_with(b"START TRANSACTION\0") => {
                self.txn_in_block = true;
                return self.on_backend_complete(ctx, tag, body);
            }
            b'C' if body.starts_with(b"SAVEPOINT\0") => {
                // ROLLBACK TO a savepoint answers ROLLBACK too, and what ran before the savepoint stays:
                // nothing of this transaction is given back.
                self.txn_savepoint = true;
                return self.on_backend_complete(ctx, tag, body);
            }
            b'C' | b'I' => return self.on_backend_complete(ctx, tag, body),
            b's' => {
                if let Some(Expect::Execute {
                    portal,
                    reservations,
                    ..
                }) = self.pop_if(|e| matches!(e, Expect::Execute { .. }))
                {
                    if !reservations.is_empty() {
                        self.suspended.insert(portal, reservations);
                    }
                }
            }
            b'E' => {
                self.txn_failed = true;
                return self.on_error(ctx, msg, body);
            }
            b'Z' => {
                self.txn_status = body.first().copied().unwrap_or(b'I');
                if self.txn_status != b'I' {
                    self.txn_in_block = true;
                }
                while let Some(e) = self.queue.pop_front() {
                    let last = matches!(
                        e,
                        Expect::Sync | Expect::Query { .. } | Expect::FunctionCall { .. }
                    );
                    self.abandon(ctx, e, "no response from the server");
                    if last {
                        break;
                    }
                }
                if self.txn_status == b'I' {
                    // Portals do not outlive their transaction.
                    self.suspended.clear();
                    let committed = !self.txn_failed;
                    self.settle(ctx, committed, !committed && !self.txn_savepoint);
                    self.txn_failed = false;
                    self.txn_savepoint = false;
                    self.txn_in_block = false;
                }
            }
            b'S' => {
                if let Some((name, rest)) = cstr(body) {
                    let value = cstr(rest)
                        .map(|(v, _)| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    match name {
                        b"client_encoding" => self.lex.client_encoding = value,
                        b"standard_conforming_strings" => {
                            self.lex.standard_conforming_strings = value == "on"
                        }
                        b"session_authorization" if !self.login_done => {
                            // Reported during the login: the user the server actually logged in.
                            self.server_user = Some(value)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        Action::Forward
    }

    pub(super) fn pop_if(&mut self, pred: impl Fn(&Expect) -> bool) -> Option<Expect> {
        if self.queue.front().is_some_and(pred) {
            self.queue.pop_front()
        } else {
            None
        }
    }

    pub(super) fn on_error(&mut self, ctx: &GateContext, _msg: &[u8], body: &[u8]) -> Action {
        let (code, message) = error_fields(body);
        let why = format!("server error {code}: {message}");
        // An aborted transaction answers everything with 25P02: that is the server's truth, not ours to rewrite.
        let ours = |r: &Option<ErrorReply>| r.clone().filter(|_| code != "25P02");
        if let Some(Expect::Query {
            reservations, done, ..
        }) = self.queue.front_mut()
        {
            // The statements after the failing one in the string do not run; the failing one may have.
            let failing = *done;
            let (ran, left): (Vec<_>, Vec<_>) = std::mem::take(reservations)
                .into_iter()
                .partition(|r| r.index == failing);
            self.release(ctx, left, &why);
            self.release_failed(ctx, ran, &why);
        }
        match self.queue.front_mut() {
            Some(Expect::Query { refused, .. }) | Some(Expect::FunctionCall { refused }) => {
                if let Some(err) = ours(refused) {
                    return Action::Replace(err.to_bytes().to_vec());
                }
                Action::Forward
            }
            Some(Expect::Sync) | None => Action::Forward,
            Some(_) => {
                // An extended-protocol message failed: the server skips everything up to Sync.
                let replacement = match self.queue.front() {
                    Some(Expect::Execute { refused, .. }) | Some(Expect::Parse { refused, .. }) => {
                        ours(refused)
                    }
                    _ => None,
                };
                // Query and FunctionCall messages sent before the Sync are skipped too.
                let mut first = true;
                while self
                    .queue
                    .front()
                    .is_some_and(|e| !matches!(e, Expect::Sync))
                {
                    match self.queue.pop_front() {
                        // The message that failed may have begun running; the rest were skipped.
                        Some(Expect::Execute { reservations, .. }) if first => {
                            self.release_failed(ctx, reservations, &why)
                        }
                        Some(e) => self.abandon(ctx, e, &why),
                        None => {}
                    }
                    first = false;
                }
                if self.queue.is_empty() {
                    self.skip_until_sync = true;
                }
                match replacement {
                    Some(err) => Action::Replace(err.to_bytes().to_vec()),
                    None => Action::Forward,
                }
            }
        }
    }
}
