//! The waiting thread's work for a statement held under `on_hold = "wait"` (see [`super::gate::wait`]): it
//! decides the message again whenever an approval is added, and one last time when the wait is over — the
//! timeout passed, the held entry was dismissed in the console, or the client cancelled or left.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::gate::waiting::{WaitEnd, WaitStart};
use super::gate::{Action, GateContext, SessionState};
use super::judge::MessageWork;
use crate::gate::HeldStatus;

/// Where the decision goes: the relay feeds the message again and takes it.
pub(super) type Decided = Box<dyn FnOnce(&[u8], Action) + Send>;

/// The work for the waiting thread. Each round reads the policy in force (`gate`: a reload while it waits
/// applies to it). `cancel` is the session's flag a CancelRequest (or the client leaving) sets; each
/// ReadyForQuery clears it (a cancel sent before was for a statement that has ended), and a wait begins only
/// after every reply is in — so a cancel sent right behind the waiting query counts. `no_thread` is set when no thread
/// could be started for the wait: the job then runs its last round at once, wherever it runs.
pub(super) fn job(
    begin: Box<WaitStart>,
    gate: Arc<arc_swap::ArcSwap<GateContext>>,
    state: Weak<Mutex<SessionState>>,
    cancel: Arc<AtomicBool>,
    no_thread: Arc<AtomicBool>,
    decided: Decided,
) -> MessageWork {
    Box::new(move |msg: &[u8]| {
        let mut seen = begin.approvals_seen;
        loop {
            let ctx = gate.load_full();
            let now = Instant::now();
            let end = if no_thread.load(Ordering::Acquire) {
                Some(WaitEnd::NoThread)
            } else if cancel.load(Ordering::Acquire) {
                Some(WaitEnd::Canceled)
            } else if ctx
                .registry
                .get(&begin.held_id)
                .is_some_and(|e| e.status == HeldStatus::Dismissed)
            {
                Some(WaitEnd::Dismissed)
            } else if now >= begin.deadline {
                Some(WaitEnd::Timeout)
            } else {
                None
            };
            if end.is_none() {
                // Woken by an approval (or a cancel), or once a second to see whether the session is still
                // there and the entry still waiting.
                let step = (begin.deadline - now).min(Duration::from_secs(1));
                let added = ctx
                    .approvals
                    .wait_added(seen, step, &|| cancel.load(Ordering::Acquire));
                if state.strong_count() == 0 {
                    // The session ended while it waited.
                    ctx.registry.set_status(&begin.held_id, HeldStatus::Held);
                    return;
                }
                if added == seen {
                    continue;
                }
                seen = added;
            }
            let Some(state) = state.upgrade() else {
                ctx.registry.set_status(&begin.held_id, HeldStatus::Held);
                return;
            };
            // The policy in force now (a reload may have come while it waited).
            let ctx = gate.load_full();
            state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .wait_round(&begin, end);
            let mut action = SessionState::on_frontend_durably(&state, &ctx, b'Q', msg);
            if action == Action::StillWaiting {
                continue;
            }
            // Decided: it runs (its entry is `authorized` once it has) or it was refused. A DISMISS that came
            // while it was decided wins: what it reserved is given back and it is refused.
            if action == Action::Forward {
                if ctx.registry.claim(&begin.held_id) {
                    decided(msg, action);
                    return;
                }
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                s.withdraw_last(&ctx, "dismissed in the stepgate console while it waited");
                s.wait_round(&begin, Some(WaitEnd::Dismissed));
                drop(s);
                action = SessionState::on_frontend_durably(&state, &ctx, b'Q', msg);
            }
            ctx.registry.set_status(&begin.held_id, HeldStatus::Held);
            decided(msg, action);
            return;
        }
    })
}
