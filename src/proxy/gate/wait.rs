//! `on_hold = "wait"`: a Query held without a token waits for an approval instead of failing at once.
//!
//! When a rule says so, a Query that would be refused — the session idle outside a transaction block, the
//! statements ones an approval could cover — is recorded as held with status `waiting`, nothing is sent to
//! the server, and the client gets a NOTICE with the held id and the commands that approve it. The relay
//! stops reading from that client and hands the message to a waiting thread
//! (`proxy::waiter`), which decides it again ([`SessionState::on_frontend_durably`], each time after
//! [`SessionState::wait_round`]) whenever an approval is added: once one covers it, it runs exactly as if the
//! approval had been there at first (uses reserved, `authorized` records fsync'd before it is forwarded);
//! when `wait_timeout` passes, the entry is dismissed in the console, or the client cancels or leaves, the
//! last round refuses it with the same held id — whatever approval arrives with it.
//!
//! Inside a transaction block nothing waits: the block's locks would be held meanwhile.

use std::time::Instant;

use super::expect::StmtInfo;
use super::waiting::{WaitEnd, WaitStart, Waiting};
use super::{Action, GateContext, SessionState};
use crate::classify::Class;
use crate::config::OnHold;
use crate::gate::HeldStatus;
use crate::proxy::authz::Denied;

impl SessionState {
    /// The next decision (of the waiting message, on its waiting thread) is a round of its wait: it runs the
    /// message if an approval now covers it, refuses it if the wait is over (`end`), and otherwise changes
    /// nothing and returns [`Action::StillWaiting`].
    pub fn wait_round(&mut self, start: &WaitStart, end: Option<WaitEnd>) {
        self.waiting = Some(Waiting {
            held_id: start.held_id.clone(),
            end,
            timeout: start.timeout,
        });
    }

    /// A waiting Query was decided to run, but its held entry was dismissed at that very moment: what the
    /// decision reserved is given back (`released`, after its `authorized` records) before it is refused
    /// instead. Its expected reply is the last one queued (nothing else of this session is decided while it
    /// waits).
    pub fn withdraw_last(&mut self, ctx: &GateContext, why: &str) {
        if let Some(entry) = self.queue.pop_back() {
            self.abandon(ctx, entry, why);
        }
    }

    /// For a Query about to be refused: begins or continues a wait instead, when its rule says so and it can
    /// wait; None to refuse it now (a last round leaves the held entry to reuse).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn wait_instead(
        &mut self,
        ctx: &GateContext,
        waiting: Option<Waiting>,
        sets_stepgate: bool,
        sql: &str,
        info: &StmtInfo,
        denied: Option<&Denied>,
        reason: Option<&str>,
    ) -> Option<Action> {
        match waiting {
            Some(Waiting { end: None, .. }) => return Some(Action::StillWaiting),
            Some(Waiting {
                end: Some(end),
                held_id,
                timeout,
            }) => {
                let note = match end {
                    WaitEnd::Dismissed => {
                        "dismissed in the stepgate console while it waited".to_string()
                    }
                    WaitEnd::Canceled => "canceled by the client while it waited".to_string(),
                    WaitEnd::NoThread => {
                        "stepgate could not start a thread to wait for an approval".to_string()
                    }
                    WaitEnd::Timeout => format!(
                        "no approval covered it within {}",
                        humantime::format_duration(timeout)
                    ),
                };
                self.reuse_held = Some((Some(held_id), note));
                return None;
            }
            None => {}
        }
        if self.rule.on_hold != OnHold::Wait {
            return None;
        }
        // Why it does not wait, said in its error (a user who configured `wait` would wonder).
        let why_not = if self.txn_in_block || self.txn_status != b'I' {
            // Waiting there would keep the block's locks.
            Some("inside a transaction block")
        } else if info.class == Class::Unparsed {
            Some("a statement PostgreSQL cannot parse is never approved")
        } else if matches!(denied, Some(Denied::AuditUnavailable)) {
            // Refused as unrecorded (58030), which says why.
            return None;
        } else if sets_stepgate {
            // Decided once: its token's record is written when it is judged.
            Some("the query string sets stepgate.token")
        } else if !self.queue.is_empty() || self.skip_until_sync || self.copy_in {
            // Every earlier reply must be in: nothing is held meanwhile, and the NOTICE goes out between
            // messages.
            Some("earlier statements of the session are still running")
        } else {
            None
        };
        if let Some(why) = why_not {
            self.reuse_held = Some((
                None,
                if why.starts_with("inside") {
                    format!("not waiting for an approval {why}")
                } else {
                    format!("not waiting for an approval: {why}")
                },
            ));
            return None;
        }
        // (Approvals come through the console, which the config requires for `wait`.)
        let approvals_seen = ctx.approvals.added();
        let (notice, held_id) =
            self.hold_entry(ctx, sql, info, HeldStatus::Waiting, denied, reason);
        let Some(held_id) = held_id.filter(|_| notice.severity == "NOTICE") else {
            // The held entry could not be recorded: refused as unrecorded.
            return Some(self.refuse_query(notice));
        };
        let timeout = self.rule.wait_timeout;
        Some(Action::Wait(Box::new(WaitStart {
            held_id,
            notice: notice.to_notice_bytes().to_vec(),
            deadline: Instant::now() + timeout,
            timeout,
            approvals_seen,
        })))
    }
}
