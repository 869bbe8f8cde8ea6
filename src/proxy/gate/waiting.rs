//! What a wait for an approval carries (see [`super::wait`]): plain data, shared by the session state and
//! the relay's waiting thread.

use std::time::{Duration, Instant};

/// A wait that begins: what the relay writes to the client, and what the waiting thread needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitStart {
    pub held_id: String,
    /// The NoticeResponse to send the client at once.
    pub notice: Vec<u8>,
    /// When the last round is due.
    pub deadline: Instant,
    pub timeout: Duration,
    /// How many approvals had been added when the wait began ([`crate::token::approvals::Approvals::added`]).
    pub approvals_seen: u64,
}

/// Why a wait is over without an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    Timeout,
    /// `DISMISS <held id>` in the console.
    Dismissed,
    /// A CancelRequest for the session (psql's Ctrl-C), or the client left.
    Canceled,
    /// No thread could be started to wait on (the system's thread limit).
    NoThread,
}

/// One round of a wait, set for one decision.
pub(super) struct Waiting {
    pub(super) held_id: String,
    /// The wait is over: refuse (reusing the held entry) rather than wait on.
    pub(super) end: Option<WaitEnd>,
    pub(super) timeout: Duration,
}
