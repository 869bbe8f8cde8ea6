//! One session as the epoll relay ([`super::epoll_relay`]) runs it: its two non-blocking sockets, the sans-IO
//! directions ([`super::flow`]), and what each readiness event does — read what is there, feed it, write
//! what the direction emits, keep what the peer cannot take yet.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::sync::oneshot;

use super::flow::{Backend, BackendEnd, Ending, Flags, Frontend, FrontendEnd, FrontendError};
use super::gate::SessionState;
use super::shared::Shared;

/// Reads one session may do per turn before the others on its relay get theirs (a bulk COPY does not
/// starve them); a session that used its budget is pumped again after the next poll.
const READS_PER_TURN: u32 = 16;

/// A session while the relay runs it, and what the task gets back when it ends.
pub(super) struct Conn {
    pub id: u64,
    pub shared: Arc<Shared>,
    /// Both legs, non-blocking.
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// Bytes read and not yet consumed (an incomplete message), per direction.
    pub from_client: BytesMut,
    pub(super) from_upstream: BytesMut,
    /// Bytes a leg could not take yet, per direction.
    pub to_client: BytesMut,
    pub to_upstream: BytesMut,
    pub(super) frontend: Frontend,
    pub backend: Backend,
    pub flags: Flags,
    pub state: Arc<Mutex<SessionState>>,
    /// Until the login completes.
    pub(super) deadline: Instant,
    /// Readiness as last reported and not yet used up: client/upstream readable/writable.
    pub(super) client_r: bool,
    /// The peer closed (or the socket failed): read until the end instead of stopping at a short read.
    pub(super) client_hup: bool,
    pub(super) upstream_hup: bool,
    pub(super) client_w: bool,
    pub(super) upstream_r: bool,
    pub(super) upstream_w: bool,
    /// It used its turn's read budget with bytes left to read: pump it again without waiting for an edge.
    pub(super) more: bool,
    /// A message from the client is being judged on a judge thread: nothing more is read from the client
    /// until it is done (see [`super::judge`]).
    pub(super) judging: bool,
    /// While `judging`: the client's buffer, frozen and shared with the judge thread (`from_client` is
    /// empty meanwhile); taken back when the judge thread reports.
    pub(super) frozen: Option<bytes::Bytes>,
    /// Why the session ended (set when the relay hands it back).
    pub ending: Option<Ending>,
    pub(super) done: Option<oneshot::Sender<Box<Conn>>>,
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        shared: Arc<Shared>,
        client: TcpStream,
        upstream: TcpStream,
        leftover: BytesMut,
        deadline: Instant,
        state: SessionState,
    ) -> (Box<Conn>, oneshot::Receiver<Box<Conn>>) {
        let (tx, rx) = oneshot::channel();
        let conn = Box::new(Conn {
            id,
            shared,
            client,
            upstream,
            from_client: leftover,
            from_upstream: BytesMut::new(),
            to_client: BytesMut::new(),
            to_upstream: BytesMut::new(),
            frontend: Frontend::new(),
            // Only plain-TCP clients come here.
            backend: Backend::new(false),
            flags: Flags::new(),
            state: Arc::new(Mutex::new(state)),
            deadline,
            client_r: true,
            client_hup: false,
            upstream_hup: false,
            client_w: true,
            upstream_r: true,
            upstream_w: true,
            more: false,
            judging: false,
            frozen: None,
            ending: None,
            done: Some(tx),
        });
        (conn, rx)
    }

    /// Moves bytes both ways until nothing more can be done without waiting; `Some` when the session ended.
    pub(super) fn pump(&mut self, scratch: &mut [u8]) -> Option<Ending> {
        self.more = false;
        let mut budget = READS_PER_TURN;
        loop {
            if budget == 0 {
                self.more = true;
                return None;
            }
            let mut progress = false;
            if !self.to_upstream.is_empty() && self.upstream_w {
                match flush(
                    &mut self.upstream,
                    &mut self.to_upstream,
                    &mut self.upstream_w,
                ) {
                    Ok(()) => progress |= self.to_upstream.is_empty(),
                    Err(e) => return Some(Ending::Frontend(Err(FrontendError::UpstreamIo(e)))),
                }
            }
            if !self.to_client.is_empty() && self.client_w {
                match flush(&mut self.client, &mut self.to_client, &mut self.client_w) {
                    Ok(()) => progress |= self.to_client.is_empty(),
                    Err(e) => return Some(Ending::Backend(Err(e))),
                }
            }
            // Nothing more is read from a client whose message waits for a judge thread, or that is waiting
            // for more replies than the bound (back-pressure: it pipelines without reading).
            if self.to_upstream.is_empty()
                && self.client_r
                && !self.judging
                && self.frontend.pending.is_none()
                && self.state.lock().map_or(0, |s| s.queued()) < super::gate::MAX_QUEUED
            {
                match read(
                    &mut self.client,
                    scratch,
                    &mut self.client_r,
                    self.client_hup,
                ) {
                    Ok(Some(0)) => return Some(Ending::Frontend(Ok(FrontendEnd::Eof))),
                    Ok(Some(n)) => {
                        if let Some(end) = self.client_sent(&scratch[..n]) {
                            return Some(end);
                        }
                        budget = budget.saturating_sub(1);
                        progress = true;
                    }
                    Ok(None) => {}
                    Err(e) => return Some(Ending::Frontend(Err(FrontendError::ClientIo(e)))),
                }
            }
            if self.to_client.is_empty() && self.upstream_r {
                match read(
                    &mut self.upstream,
                    scratch,
                    &mut self.upstream_r,
                    self.upstream_hup,
                ) {
                    Ok(Some(0)) => return Some(Ending::Backend(Ok(BackendEnd::Eof))),
                    Ok(Some(n)) => {
                        if let Some(end) = self.upstream_sent(&scratch[..n]) {
                            return Some(end);
                        }
                        budget = budget.saturating_sub(1);
                        progress = true;
                    }
                    Ok(None) => {}
                    Err(e) => return Some(Ending::Backend(Err(e))),
                }
            }
            if !progress {
                return None;
            }
        }
    }

    /// A statement of this session waiting for an approval gives up (the client cancelled or left).
    pub(super) fn give_up_wait(&self) {
        self.flags
            .cancel_wait
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared.gate.load().approvals.nudge();
    }

    /// Writes the NOTICE of a statement that waits for an approval, if there is one (see [`Flags::notice`]);
    /// `Some` when the client's leg failed.
    pub(super) fn send_notice(&mut self) -> Option<Ending> {
        let notice = self.flags.take_notice(self.backend.at_boundary())?;
        let mut failed = None;
        send(
            &mut self.client,
            &mut self.to_client,
            &mut self.client_w,
            &mut failed,
            &notice,
        );
        failed.map(|e| Ending::Backend(Err(e)))
    }

    /// Feeds bytes from the client to the frontend direction, whose output goes upstream.
    pub(super) fn client_sent(&mut self, new: &[u8]) -> Option<Ending> {
        let mut failed = None;
        let fed = feed_kept(&mut self.from_client, new, |data| {
            self.frontend
                .feed(data, &self.flags, &self.shared, &self.state, &mut |bytes| {
                    send(
                        &mut self.upstream,
                        &mut self.to_upstream,
                        &mut self.upstream_w,
                        &mut failed,
                        bytes,
                    )
                })
        });
        match (fed, failed) {
            (Err(e), _) => Some(Ending::Frontend(Err(e))),
            (Ok(_), Some(e)) => Some(Ending::Frontend(Err(FrontendError::UpstreamIo(e)))),
            (Ok(true), None) => Some(Ending::Frontend(Ok(FrontendEnd::Terminate))),
            (Ok(false), None) => None,
        }
    }

    /// Feeds bytes from the upstream to the backend direction, whose output goes to the client.
    pub(super) fn upstream_sent(&mut self, new: &[u8]) -> Option<Ending> {
        let mut failed = None;
        let fed = feed_kept(&mut self.from_upstream, new, |data| {
            self.backend
                .feed(data, &self.flags, &self.shared, &self.state, &mut |bytes| {
                    send(
                        &mut self.client,
                        &mut self.to_client,
                        &mut self.client_w,
                        &mut failed,
                        bytes,
                    )
                })
        });
        match (fed, failed) {
            (Err(e), _) => Some(Ending::Backend(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                e,
            )))),
            (Ok(_), Some(e)) => Some(Ending::Backend(Err(e))),
            (Ok(true), None) => Some(Ending::Backend(Ok(BackendEnd::LoginFailed))),
            (Ok(false), None) => None,
        }
    }
}

/// Feeds `new` to a direction — after the incomplete message `kept` from earlier reads, if any (copied only
/// then) — and keeps what it did not consume for the next read.
fn feed_kept<T, E>(
    kept: &mut BytesMut,
    new: &[u8],
    feed: impl FnOnce(&[u8]) -> Result<(usize, T), E>,
) -> Result<T, E> {
    if kept.is_empty() {
        let (used, out) = feed(new)?;
        kept.extend_from_slice(&new[used..]);
        Ok(out)
    } else {
        kept.extend_from_slice(new);
        let (used, out) = feed(kept)?;
        kept.advance(used);
        if kept.is_empty() && kept.capacity() > super::judge::TRIM_AFTER_BYTES {
            // A large message's buffer is not kept for the rest of the session.
            *kept = BytesMut::new();
        }
        Ok(out)
    }
}

/// Writes `bytes` now if the leg takes them, queueing what it does not (and everything, once something is
/// queued, so order is kept). A write error is kept in `failed`; later bytes are dropped.
fn send(
    sock: &mut TcpStream,
    queue: &mut BytesMut,
    writable: &mut bool,
    failed: &mut Option<io::Error>,
    bytes: &[u8],
) {
    if failed.is_some() {
        return;
    }
    if !queue.is_empty() || !*writable {
        queue.extend_from_slice(bytes);
        return;
    }
    let mut off = 0;
    while off < bytes.len() {
        match sock.write(&bytes[off..]) {
            Ok(0) => {
                *failed = Some(io::ErrorKind::WriteZero.into());
                return;
            }
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *writable = false;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                *failed = Some(e);
                return;
            }
        }
    }
    queue.extend_from_slice(&bytes[off..]);
}

/// Writes from the front of `queue` until it is empty or the leg would block.
fn flush(sock: &mut TcpStream, queue: &mut BytesMut, writable: &mut bool) -> io::Result<()> {
    while !queue.is_empty() {
        match sock.write(queue) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => queue.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *writable = false;
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One read: `Some(n)` bytes (0 at end of stream), `None` when nothing is there. A read that does not fill
/// the buffer drained the socket: the next arrival raises a new edge, so the readiness is used up without a
/// second, empty read — unless the peer's close was already reported (`hup`), which raises no further edge.
fn read(
    sock: &mut TcpStream,
    buf: &mut [u8],
    readable: &mut bool,
    hup: bool,
) -> io::Result<Option<usize>> {
    loop {
        match sock.read(buf) {
            Ok(n) => {
                if n > 0 && n < buf.len() && !hup {
                    *readable = false;
                }
                return Ok(Some(n));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *readable = false;
                return Ok(None);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// [`Conn::pump`], with a panic (a bug) ending only this session.
///
/// The session's span is not entered here: entering it on every wake-up cost more than the gate's fast
/// path, and the session state enters it on the paths that log.
pub(super) fn guarded_pump(
    conn: &mut Conn,
    scratch: &mut [u8],
    span: &tracing::Span,
) -> Option<Ending> {
    catch_panic(span, || conn.pump(scratch))
}

pub(super) fn catch_panic(
    span: &tracing::Span,
    f: impl FnOnce() -> Option<Ending>,
) -> Option<Ending> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(ended) => ended,
        Err(_) => {
            let _log = span.enter();
            tracing::error!("relay: a panic while relaying; the session is closed");
            Some(Ending::Internal)
        }
    }
}
