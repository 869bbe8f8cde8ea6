//! The two directions of a session's relay, sans-IO: each is fed the bytes read from its side and hands the
//! bytes to forward (the original ones, or a replacement) to an `emit` callback, in order. The async relay
//! (TLS legs, `--workers 0`) and the epoll relay ([`super::relay`]) drive the same code.
//!
//! The frontend direction peeks every message header and forwards the original bytes; only the messages it
//! must look at (Terminate, and before login the SASL initial response) are held until complete. The backend
//! direction does the same for ReadyForQuery, authentication requests, BackendKeyData and errors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use thiserror::Error;

use super::gate::{Action, GateContext, SessionState};
use super::shared::Shared;
use crate::wire::frame::{self, FrameError, FrameScanner, Step};
use crate::wire::reply::is_fatal;

/// Largest frontend message before login (password, SASL): 64 KiB.
pub const MAX_AUTH_MESSAGE: usize = 64 * 1024;
/// Upper bound on any backend message (PostgreSQL's own messages stay below 1 GiB plus headers).
const MAX_BACKEND_MESSAGE: usize = i32::MAX as usize;

/// Flags the two directions share. Each is written by one direction and read by the other.
#[derive(Default)]
pub(super) struct Flags {
    /// The upstream sent its first ReadyForQuery: login is complete.
    pub logged_in: AtomicBool,
    /// The client sent Terminate: an upstream close is expected.
    pub client_terminated: AtomicBool,
    /// The upstream asked for SASL: the client's next password message is a SASLInitialResponse.
    pub sasl_initial_next: AtomicBool,
    /// The upstream sent a FATAL error: it explains the close itself.
    pub upstream_fatal: AtomicBool,
    /// Everything written to the client so far ends at a message boundary.
    pub client_at_boundary: AtomicBool,
    /// Signalled with `logged_in`: the async relay drops its login timer.
    pub login_done: tokio::sync::Notify,
    /// A NOTICE for the client from the frontend direction (a held statement now waits for an approval),
    /// written by whoever writes to the client ([`Flags::take_notice`]); the async relay is woken by
    /// `notice_ready`.
    notice: Mutex<Option<Vec<u8>>>,
    pub notice_ready: tokio::sync::Notify,
    /// Set by a CancelRequest with this session's key: a statement waiting for an approval gives up.
    pub cancel_wait: std::sync::Arc<AtomicBool>,
}

impl Flags {
    pub fn new() -> Flags {
        let flags = Flags::default();
        flags.client_at_boundary.store(true, Ordering::Relaxed);
        flags
    }

    fn set_notice(&self, notice: Vec<u8>) {
        *self.notice.lock().unwrap_or_else(|p| p.into_inner()) = Some(notice);
        self.notice_ready.notify_one();
    }

    /// The NOTICE to write to the client now, if any. It goes out only between two messages (`at_boundary`:
    /// everything written to the client so far ends at one); a wait begins only when every reply is in, so
    /// only an asynchronous message still arriving (a NOTIFY) can be in the way, and then the NOTICE is
    /// dropped rather than cut into it.
    pub fn take_notice(&self, at_boundary: bool) -> Option<Vec<u8>> {
        let notice = self
            .notice
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        if !at_boundary {
            tracing::debug!(
                "a wait's NOTICE was dropped: the client was in the middle of a message"
            );
            return None;
        }
        Some(notice)
    }
}

#[derive(Debug, Error)]
pub(super) enum FrontendError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("the client asked for SCRAM channel binding ({0}), which cannot pass through a proxy")]
    ChannelBinding(String),
    /// PostgreSQL reads messages pipelined behind the login only once it completes, after stepgate stopped
    /// looking at the login: such a message would run unjudged, so the session is refused instead.
    #[error("the client sent a {0:?} message before the login completed")]
    BeforeLogin(char),
    #[error("client: {0}")]
    ClientIo(std::io::Error),
    #[error("upstream: {0}")]
    UpstreamIo(std::io::Error),
    /// A bug in stepgate's bookkeeping: the session ends rather than guess.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// The session state and the policy, taken once per fed chunk and only when a message needs them.
struct Gate<'a> {
    shared: &'a Shared,
    state: &'a Mutex<SessionState>,
    held: Option<(
        std::sync::MutexGuard<'a, SessionState>,
        arc_swap::Guard<std::sync::Arc<GateContext>>,
    )>,
}

impl<'a> Gate<'a> {
    fn new(shared: &'a Shared, state: &'a Mutex<SessionState>) -> Self {
        Gate {
            shared,
            state,
            held: None,
        }
    }

    fn get(&mut self) -> (&mut SessionState, &GateContext) {
        let (state, ctx) = self.held.get_or_insert_with(|| {
            (
                self.state.lock().unwrap_or_else(|p| p.into_inner()),
                self.shared.gate.load(),
            )
        });
        (state, ctx)
    }
}

/// Client → upstream.
pub(super) struct Frontend {
    scanner: FrameScanner,
    logged_in: bool,
    /// Set when feeding stopped before a message that must be judged on a judge thread first: the caller
    /// runs the job (off its relay thread), then calls [`Frontend::judged`] and feeds the same bytes again.
    pub pending: Option<super::judge::MessageJob>,
    /// What the last job was, until the message it stopped at is fed again: that message is not sent to
    /// the judge threads a second time for the same reason (a large statement's verdict may be cached under
    /// its shape rather than its bytes; a decision that did not come back was a bug, and the relay thread
    /// decides instead).
    offloaded: Option<Offload>,
    /// The message at the front was decided on a judge thread, its evidence written there
    /// ([`SessionState::on_frontend_durably`]): (its [`message_key`], the action), used when it is fed again.
    decided: std::sync::Arc<Mutex<Option<Decided>>>,
    /// Keys [`message_key`] (random per session, so no client can make two messages match).
    hasher: std::collections::hash_map::RandomState,
}

/// A message's key and the action decided for it on a judge thread.
type Decided = ((usize, u64), Action);

/// What identifies a message decided on a judge thread when it is fed again: its length and a keyed hash of
/// its bytes (the message itself is not kept: the relay takes its buffer back whole).
fn message_key(hasher: &std::collections::hash_map::RandomState, msg: &[u8]) -> (usize, u64) {
    use std::hash::BuildHasher;
    (msg.len(), hasher.hash_one(msg))
}

/// Why a message was handed to a judge thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offload {
    /// A large statement not classified yet: classified there, decided here.
    Classify,
    /// A decision that may need fsync'd evidence: decided there.
    Decide,
}

impl Frontend {
    pub fn new() -> Self {
        Frontend {
            scanner: FrameScanner::new(MAX_AUTH_MESSAGE),
            logged_in: false,
            pending: None,
            offloaded: None,
            decided: Default::default(),
            hasher: Default::default(),
        }
    }

    /// The job of [`Frontend::pending`] is done (or failed): the message it stopped at is fed again next,
    /// and is not handed to a judge thread again for the same reason.
    pub fn judged(&mut self) {}

    /// Carries out the action decided for the message at `at` (`len` bytes of `data`): returns where
    /// scanning resumes, or None when feeding stops there (a wait begins; the message is fed again later).
    #[allow(clippy::too_many_arguments)]
    fn act(
        &mut self,
        action: Action,
        (data, start, at, len): (&[u8], &mut usize, usize, usize),
        emit: &mut impl FnMut(&[u8]),
        flags: &Flags,
        shared: &Shared,
        state: &std::sync::Arc<Mutex<SessionState>>,
    ) -> Result<Option<usize>, FrontendError> {
        match action {
            Action::Forward => Ok(Some(at + len)),
            Action::Replace(replacement) => {
                Ok(Some(substitute(emit, data, start, at, len, &replacement)))
            }
            Action::Wait(begin) => {
                self.wait(begin, len, flags, shared, state);
                Ok(None)
            }
            // Only a waiting thread's round can decide this (see `waiter`); here it would be a bug.
            Action::StillWaiting => Err(FrontendError::Internal(
                "a statement was decided as a round of a wait it is not in",
            )),
        }
    }

    /// A held Query waits for an approval (`on_hold = "wait"`, see [`super::gate::wait`]): the client gets
    /// the NOTICE, and the message (`len` bytes, at the front of what is fed) goes to a waiting thread,
    /// which decides it again whenever an approval is added, and for the last time when the wait is over
    /// (or its held entry is dismissed, or the session ends). The decision comes back like a judge
    /// thread's: the message is fed again and takes it.
    fn wait(
        &mut self,
        mut begin: Box<super::gate::waiting::WaitStart>,
        len: usize,
        flags: &Flags,
        shared: &Shared,
        state: &std::sync::Arc<Mutex<SessionState>>,
    ) {
        flags.set_notice(std::mem::take(&mut begin.notice));
        let (slot, hasher) = (self.decided.clone(), self.hasher.clone());
        let decided = Box::new(move |msg: &[u8], action: Action| {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((message_key(&hasher, msg), action));
        });
        let no_thread = std::sync::Arc::new(AtomicBool::new(false));
        let run = super::waiter::job(
            begin,
            shared.gate.clone(),
            std::sync::Arc::downgrade(state),
            flags.cancel_wait.clone(),
            no_thread.clone(),
            decided,
        );
        self.pending = Some(super::judge::MessageJob::waiting(len, run, no_thread));
        self.offloaded = Some(Offload::Decide);
    }

    /// Processes `data` (what the client sent and is not consumed yet), emitting what to send upstream.
    /// Returns how many bytes were consumed (the rest is the start of an incomplete message, to be fed again
    /// with more bytes after it) and whether the client sent Terminate (nothing after it is consumed).
    pub fn feed(
        &mut self,
        data: &[u8],
        flags: &Flags,
        shared: &Shared,
        state: &std::sync::Arc<Mutex<SessionState>>,
        emit: &mut impl FnMut(&[u8]),
    ) -> Result<(usize, bool), FrontendError> {
        if self.pending.is_some() {
            // A message waits for its job: nothing is consumed until the relay has run it.
            return Ok((0, false));
        }
        if !self.logged_in && flags.logged_in.load(Ordering::Acquire) {
            self.logged_in = true;
            self.scanner.set_max_len(shared.config.max_message_size);
        }
        let logged_in = self.logged_in;
        let mut gate = Gate::new(shared, state);
        // `data[start..ready]` is scanned and not yet emitted.
        let mut start = 0;
        let mut ready = 0;
        let mut terminate = false;
        loop {
            // Before login every message is looked at: only authentication replies and Terminate may pass.
            let inspect = |t: u8| !logged_in || t == b'X' || SessionState::inspects_frontend(t);
            match self.scanner.step(&data[ready..], inspect)? {
                Step::NeedMore => break,
                Step::Message { tag, len } => {
                    let msg = &data[ready..ready + len];
                    match tag {
                        b'X' => terminate = true,
                        b'p' if !logged_in
                            && flags.sasl_initial_next.swap(false, Ordering::AcqRel) =>
                        {
                            let mechanism =
                                frame::cstr(frame::body(msg)).map(|(m, _)| m).unwrap_or(&[]);
                            if mechanism.ends_with(b"-PLUS") {
                                return Err(FrontendError::ChannelBinding(
                                    String::from_utf8_lossy(mechanism).into_owned(),
                                ));
                            }
                        }
                        b'p' if !logged_in => {}
                        _ if !logged_in => return Err(FrontendError::BeforeLogin(tag as char)),
                        _ => {
                            let after = self.offloaded.take();
                            // A decision can only be waiting right after a decision job: the ordinary
                            // message takes no lock here.
                            let decided = if after == Some(Offload::Decide) {
                                self.decided
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .take()
                                    .filter(|(key, _)| *key == message_key(&self.hasher, msg))
                            } else {
                                None
                            };
                            let action = match decided {
                                Some((_, action)) => action,
                                None => {
                                    let (session, ctx) = gate.get();
                                    if after.is_none()
                                        && matches!(tag, b'Q' | b'P')
                                        && msg.len() >= super::judge::OFFLOAD_BYTES
                                    {
                                        if let Some(job) =
                                            session.offload(&shared.gate.load_full(), tag, msg)
                                        {
                                            // Classified elsewhere first; this message is fed again afterwards.
                                            self.pending =
                                                Some(super::judge::MessageJob::new(msg.len(), job));
                                            self.offloaded = Some(Offload::Classify);
                                            break;
                                        }
                                    }
                                    if after != Some(Offload::Decide)
                                        && matches!(tag, b'Q' | b'E')
                                        && session.needs_durable_write(ctx, tag, msg)
                                    {
                                        // Decided on a judge thread, where its fsync'd evidence is written; this
                                        // message is fed again afterwards and takes that decision.
                                        let (state, ctx, slot, hasher) = (
                                            state.clone(),
                                            shared.gate.load_full(),
                                            self.decided.clone(),
                                            self.hasher.clone(),
                                        );
                                        drop(gate);
                                        let decide = move |msg: &[u8]| {
                                            let action = SessionState::on_frontend_durably(
                                                &state, &ctx, tag, msg,
                                            );
                                            *slot.lock().unwrap_or_else(|p| p.into_inner()) =
                                                Some((message_key(&hasher, msg), action));
                                        };
                                        self.pending = Some(super::judge::MessageJob::new(
                                            msg.len(),
                                            Box::new(decide),
                                        ));
                                        self.offloaded = Some(Offload::Decide);
                                        break;
                                    }
                                    let action = session.on_frontend(ctx, tag, msg);
                                    if msg.len() >= super::judge::TRIM_AFTER_BYTES
                                        && matches!(tag, b'Q' | b'P')
                                    {
                                        super::judge::release_free_memory();
                                    }
                                    action
                                }
                            };
                            let next = self.act(
                                action,
                                (data, &mut start, ready, len),
                                emit,
                                flags,
                                shared,
                                state,
                            )?;
                            match next {
                                Some(next) => {
                                    ready = next;
                                    continue;
                                }
                                None => break,
                            }
                        }
                    }
                    ready += len;
                    if terminate {
                        break;
                    }
                }
                Step::Stream { now, .. } => ready += now,
                Step::Pass(n) => ready += n,
            }
        }
        emit_range(emit, data, start, ready);
        if terminate {
            flags.client_terminated.store(true, Ordering::Release);
        }
        Ok((ready, terminate))
    }
}

/// Upstream → client.
pub(super) struct Backend {
    scanner: FrameScanner,
    logged_in: bool,
    client_tls: bool,
    /// BackendKeyData this session registered in `Shared::cancel_keys` (removed when it ends).
    pub keys: Vec<(i32, i32)>,
}

impl Backend {
    pub fn new(client_tls: bool) -> Self {
        Backend {
            // Until the login completes only the server's small login messages may come.
            scanner: FrameScanner::new(MAX_AUTH_MESSAGE),
            logged_in: false,
            client_tls,
            keys: Vec::new(),
        }
    }

    /// True when everything fed so far ends at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.scanner.at_boundary()
    }

    /// Processes `data` (what the upstream sent and is not consumed yet), emitting what to send to the
    /// client. Returns how many bytes were consumed and whether the login failed (the session ends once the
    /// emitted bytes are written).
    pub fn feed(
        &mut self,
        data: &[u8],
        flags: &Flags,
        shared: &Shared,
        state: &Mutex<SessionState>,
        emit: &mut impl FnMut(&[u8]),
    ) -> Result<(usize, bool), FrameError> {
        let mut gate = Gate::new(shared, state);
        let mut start = 0;
        let mut ready = 0;
        let mut login_failed = false;
        loop {
            let logged_in = self.logged_in;
            // Before login every message is looked at whole: only what a PostgreSQL server sends while
            // logging a client in may pass (anything else, an HTTP server's reply say, reaches nobody).
            let inspect = |t: u8| !logged_in || SessionState::inspects_backend(t);
            let step = self
                .scanner
                .step(&data[ready..], inspect)
                .map_err(|e| match e {
                    FrameError::TooShort { tag, .. } | FrameError::TooLong { tag, .. }
                        if !logged_in =>
                    {
                        FrameError::NotPostgres {
                            tag,
                            during: "during the login",
                        }
                    }
                    e => e,
                })?;
            match step {
                Step::NeedMore => break,
                Step::Message { tag, len } => {
                    let body = frame::body(&data[ready..ready + len]);
                    if !logged_in && !matches!(tag, b'R' | b'S' | b'K' | b'Z' | b'E' | b'N' | b'v')
                    {
                        return Err(FrameError::NotPostgres {
                            tag: tag as char,
                            during: "during the login",
                        });
                    }
                    match tag {
                        b'Z' if !self.logged_in => {
                            self.logged_in = true;
                            self.scanner.set_max_len(MAX_BACKEND_MESSAGE);
                            flags.logged_in.store(true, Ordering::Release);
                            flags.login_done.notify_one();
                            // A token from the startup packet counts only once the server accepted the login.
                            let (state, ctx) = gate.get();
                            if let Err(fatal) = state.on_login(ctx) {
                                emit_range(emit, data, start, ready);
                                emit(&fatal.to_bytes());
                                flags.upstream_fatal.store(true, Ordering::Release);
                                return Ok((data.len(), true));
                            }
                        }
                        b'R' if frame::be_u32(body, 0) == Some(10) => {
                            flags.sasl_initial_next.store(true, Ordering::Release);
                            let rewritten = if self.client_tls {
                                None
                            } else {
                                frame::sasl_without_channel_binding(body)
                            };
                            if let Some(replacement) = rewritten {
                                ready =
                                    substitute(emit, data, &mut start, ready, len, &replacement);
                                continue;
                            }
                        }
                        b'K' if body.len() == 8 => {
                            let (pid, key) = (
                                frame::be_i32(body, 0).unwrap_or(0),
                                frame::be_i32(body, 4).unwrap_or(0),
                            );
                            shared
                                .cancel_keys
                                .insert((pid, key), flags.cancel_wait.clone());
                            self.keys.push((pid, key));
                        }
                        b'E' if !self.logged_in => login_failed = true,
                        _ => {}
                    }
                    if tag == b'Z' && flags.cancel_wait.load(Ordering::Relaxed) {
                        // A cancel sent before this was for a statement that has now ended: it must not
                        // end a later wait for an approval.
                        flags.cancel_wait.store(false, Ordering::Release);
                    }
                    if tag == b'E' && is_fatal(body) {
                        flags.upstream_fatal.store(true, Ordering::Release);
                    }
                    if self.logged_in || tag == b'S' {
                        let msg = &data[ready..ready + len];
                        let (state, ctx) = gate.get();
                        if let Action::Replace(replacement) = state.on_backend(ctx, tag, msg) {
                            ready = substitute(emit, data, &mut start, ready, len, &replacement);
                            continue;
                        }
                    }
                    ready += len;
                }
                Step::Stream { now, .. } => ready += now,
                Step::Pass(n) => ready += n,
            }
        }
        emit_range(emit, data, start, ready);
        Ok((ready, login_failed))
    }
}

/// Emits `data[start..end]` unless it is empty.
fn emit_range(emit: &mut impl FnMut(&[u8]), data: &[u8], start: usize, end: usize) {
    if end > start {
        emit(&data[start..end]);
    }
}

/// Emits what was scanned since `*start` up to the message at `at`, then `replacement` instead of that
/// message (`len` bytes); returns where scanning resumes, which is also where the next emitted run starts.
fn substitute(
    emit: &mut impl FnMut(&[u8]),
    data: &[u8],
    start: &mut usize,
    at: usize,
    len: usize,
    replacement: &[u8],
) -> usize {
    emit_range(emit, data, *start, at);
    emit(replacement);
    *start = at + len;
    *start
}

/// How a session ended.
pub(super) enum FrontendEnd {
    Terminate,
    Eof,
}

pub(super) enum BackendEnd {
    Eof,
    LoginFailed,
}

pub(super) enum Ending {
    Frontend(Result<FrontendEnd, FrontendError>),
    Backend(Result<BackendEnd, std::io::Error>),
    LoginTimeout,
    Shutdown,
    /// A bug in stepgate (a panic while relaying): this session ends, the others go on.
    Internal,
}

/// How much to ask the kernel for per read.
pub(super) const READ_CHUNK: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_detection() {
        assert!(is_fatal(b"SFATAL\0VFATAL\0C57P01\0\0"));
        assert!(!is_fatal(b"SERROR\0C42601\0\0"));
        assert!(!is_fatal(b"S"));
    }
}
