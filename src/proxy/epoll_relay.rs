//! The epoll relay: plain-TCP sessions spend their life here, in one event loop per worker thread, instead
//! of in an async task.
//!
//! A session's async task negotiates the startup, connects upstream and sends the startup packet; when both
//! legs are plain TCP it hands the two sockets to its worker's relay ([`Handle::adopt`]) and waits. The
//! relay drives the same sans-IO directions as the async relay ([`super::flow`]): on readiness it reads
//! what is there, feeds it, writes what the direction emits, and keeps what the peer cannot take yet (it
//! stops reading that side until it can). When the session ends (either side closes, a protocol error, the
//! login deadline, a forced shutdown) the relay hands everything back to the task, which writes what was
//! still queued, tells the client why and closes both legs ([`super::session::finish`]).
//!
//! Why not the async relay: per round trip a general-purpose runtime adds task wake-ups, scheduling and timer
//! checks that measured 2–3 times the CPU of the relaying itself (README "Performance"). The loop here does
//! the two reads and two writes a round trip needs, and one `epoll_wait` per batch of ready sockets.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::warn;

pub(super) use super::epoll_conn::Conn;
use super::epoll_conn::{catch_panic, guarded_pump};
use super::flow::Ending;

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 64 * 1024;
const WAKER: Token = Token(usize::MAX);

enum Command {
    /// A session and the tracing span its log lines belong to.
    Adopt(tracing::Span, Box<Conn>),
    /// End this session now (forced shutdown).
    Close(u64),
    Stop,
}

/// Sends work to one relay thread. When the last handle goes (the server is dropped, however it ended), the
/// thread is told to stop.
#[derive(Clone)]
pub(super) struct Handle(Arc<Inner>);

struct Inner {
    tx: mpsc::Sender<Command>,
    waker: Arc<Waker>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.tx.send(Command::Stop).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

impl Handle {
    /// Starts a relay thread.
    pub fn start(name: String) -> io::Result<(Handle, std::thread::JoinHandle<()>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = mpsc::channel();
        // The thread keeps the waker too: closing its eventfd would drop a wake-up already signalled (a Stop
        // sent just before the last handle went) and leave the thread in epoll_wait for good.
        let kept = waker.clone();
        let (judged_tx, judged_rx) = mpsc::channel();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            Worker {
                poll,
                _waker: kept,
                rx,
                judged_tx,
                judged_rx,
                slots: Vec::new(),
                free: Vec::new(),
                by_id: std::collections::HashMap::new(),
                logging_in: Vec::new(),
                again: Vec::new(),
            }
            .run()
        })?;
        Ok((Handle(Arc::new(Inner { tx, waker })), thread))
    }

    /// Hands a session over; gives it back when the relay thread is gone.
    pub fn adopt(&self, conn: Box<Conn>) -> Result<(), Box<Conn>> {
        let span = tracing::Span::current();
        self.0
            .tx
            .send(Command::Adopt(span, conn))
            .map_err(|e| match e.0 {
                Command::Adopt(_, conn) => conn,
                _ => unreachable!("sent an Adopt"),
            })?;
        let _ = self.0.waker.wake();
        Ok(())
    }

    /// Ends a session with [`Ending::Shutdown`].
    pub fn close(&self, id: u64) {
        if self.0.tx.send(Command::Close(id)).is_ok() {
            let _ = self.0.waker.wake();
        }
    }

    /// Ends the thread; sessions still on it are dropped (their tasks see the relay gone).
    pub fn stop(&self) {
        if self.0.tx.send(Command::Stop).is_ok() {
            let _ = self.0.waker.wake();
        }
    }
}

struct Worker {
    poll: Poll,
    _waker: Arc<Waker>,
    rx: mpsc::Receiver<Command>,
    /// Judge threads report here (with a wake-up) which session's message they judged.
    judged_tx: mpsc::Sender<u64>,
    judged_rx: mpsc::Receiver<u64>,
    slots: Vec<Option<(tracing::Span, Box<Conn>)>>,
    free: Vec<usize>,
    by_id: std::collections::HashMap<u64, usize>,
    /// Sessions not logged in yet: (deadline, slot, id).
    logging_in: Vec<(Instant, usize, u64)>,
    /// Sessions that used their turn with bytes left: (slot, id).
    again: Vec<(usize, u64)>,
}

impl Worker {
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut scratch = vec![0u8; READ_CHUNK].into_boxed_slice();
        loop {
            let timeout = match self.check_deadlines() {
                _ if !self.again.is_empty() => Some(std::time::Duration::ZERO),
                t => t,
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(error = %e, "relay: epoll failed; its sessions end");
                return;
            }
            for ev in events.iter() {
                if ev.token() == WAKER {
                    if !self.commands(&mut scratch) {
                        return;
                    }
                    self.judged(&mut scratch);
                    continue;
                }
                let slot = ev.token().0 >> 1;
                let Some(Some((span, conn))) = self.slots.get_mut(slot) else {
                    continue;
                };
                let hup = ev.is_read_closed() || ev.is_error();
                let r = ev.is_readable() || hup;
                let w = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                if ev.token().0 & 1 == 0 {
                    conn.client_r |= r;
                    conn.client_hup |= hup;
                    conn.client_w |= w;
                    if hup && conn.judging {
                        // The client left while its statement waits for an approval: the wait ends (an
                        // approval must not run it for nobody). Nothing is read from it meanwhile, so its
                        // close is seen here.
                        conn.give_up_wait();
                    }
                } else {
                    conn.upstream_r |= r;
                    conn.upstream_hup |= hup;
                    conn.upstream_w |= w;
                }
                let ended = guarded_pump(conn, &mut scratch, span);
                self.settle(slot, ended);
            }
            for (slot, id) in std::mem::take(&mut self.again) {
                let Some(Some((span, conn))) = self.slots.get_mut(slot) else {
                    continue;
                };
                // Pumped again above in this round (an edge came), or a new session in a reused slot.
                if conn.id != id || !conn.more {
                    continue;
                }
                let ended = guarded_pump(conn, &mut scratch, span);
                self.settle(slot, ended);
            }
        }
    }

    /// Ends sessions whose login deadline passed; returns how long until the next deadline.
    fn check_deadlines(&mut self) -> Option<std::time::Duration> {
        if self.logging_in.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut expired = Vec::new();
        let slots = &self.slots;
        self.logging_in.retain(|&(deadline, slot, id)| {
            let Some(Some((_, conn))) = slots.get(slot) else {
                return false;
            };
            if conn.id != id
                || conn
                    .flags
                    .logged_in
                    .load(std::sync::atomic::Ordering::Acquire)
            {
                return false;
            }
            if deadline <= now {
                expired.push(slot);
                return false;
            }
            true
        });
        for slot in expired {
            self.release(slot, Ending::LoginTimeout);
        }
        self.logging_in
            .iter()
            .map(|&(d, _, _)| d.saturating_duration_since(now))
            .min()
    }

    /// Runs queued commands; false on Stop.
    fn commands(&mut self, scratch: &mut [u8]) -> bool {
        loop {
            let cmd = match self.rx.try_recv() {
                Ok(cmd) => cmd,
                Err(mpsc::TryRecvError::Empty) => return true,
                // Every handle is gone (Inner's Drop sent a Stop first; this is the belt to its braces).
                Err(mpsc::TryRecvError::Disconnected) => return false,
            };
            match cmd {
                Command::Adopt(span, conn) => self.adopt(span, conn, scratch),
                Command::Close(id) => {
                    if let Some(&slot) = self.by_id.get(&id) {
                        self.release(slot, Ending::Shutdown);
                    }
                }
                Command::Stop => return false,
            }
        }
    }

    fn adopt(&mut self, span: tracing::Span, mut conn: Box<Conn>, scratch: &mut [u8]) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let registry = self.poll.registry();
        let both = Interest::READABLE | Interest::WRITABLE;
        let registered = registry
            .register(
                &mut SourceFd(&conn.client.as_raw_fd()),
                Token(slot << 1),
                both,
            )
            .and_then(|()| {
                registry.register(
                    &mut SourceFd(&conn.upstream.as_raw_fd()),
                    Token(slot << 1 | 1),
                    both,
                )
            });
        self.by_id.insert(conn.id, slot);
        self.logging_in.push((conn.deadline, slot, conn.id));
        let ended = match registered {
            Err(e) => Some(Ending::Backend(Err(e))),
            Ok(()) => {
                // Bytes the client sent after its startup packet, before the relay took over.
                let leftover = std::mem::take(&mut conn.from_client);
                match catch_panic(&span, || conn.client_sent(&leftover)) {
                    Some(end) => Some(end),
                    None => guarded_pump(&mut conn, scratch, &span),
                }
            }
        };
        self.slots[slot] = Some((span, conn));
        self.settle(slot, ended);
    }

    /// After a turn: gives back a session that ended, hands a message to be judged to the judge threads, or
    /// queues another turn for one that used its budget.
    fn settle(&mut self, slot: usize, ended: Option<Ending>) {
        match ended {
            Some(ending) => self.release(slot, ending),
            None => {
                if let Some(Some((_, conn))) = self.slots.get_mut(slot) {
                    if let Some(work) = conn.frontend.pending.take() {
                        conn.judging = true;
                        // The job shares the client's buffer, whose front is the message.
                        let frozen = std::mem::take(&mut conn.from_client).freeze();
                        let waits = work.waits();
                        let job = work.bind(&frozen);
                        // A held statement that waits for an approval: the client hears why at once. A client
                        // whose close came before the wait began (with the query itself) is not reported
                        // again (edge-triggered): it has left already.
                        let failed = conn.send_notice();
                        if waits.is_some() && conn.client_hup {
                            conn.give_up_wait();
                        }
                        conn.frozen = Some(frozen);
                        let (tx, waker, id) =
                            (self.judged_tx.clone(), self._waker.clone(), conn.id);
                        conn.shared.judges.submit_for(
                            waits,
                            Box::new(move || {
                                // Reported even if the job panics (a bug): the session is fed again and
                                // decides on this thread instead of waiting for good.
                                struct Done(mpsc::Sender<u64>, Arc<Waker>, u64);
                                impl Drop for Done {
                                    fn drop(&mut self) {
                                        if self.0.send(self.2).is_ok() {
                                            let _ = self.1.wake();
                                        }
                                    }
                                }
                                let _done = Done(tx, waker, id);
                                job();
                            }),
                        );
                        if let Some(end) = failed {
                            self.release(slot, end);
                        }
                    } else if conn.more {
                        self.again.push((slot, conn.id));
                    }
                }
            }
        }
    }

    /// Feeds again the messages the judge threads are done with.
    fn judged(&mut self, scratch: &mut [u8]) {
        while let Ok(id) = self.judged_rx.try_recv() {
            let Some(&slot) = self.by_id.get(&id) else {
                continue; // the session ended meanwhile
            };
            let Some(Some((span, conn))) = self.slots.get_mut(slot) else {
                continue;
            };
            if !conn.judging {
                continue;
            }
            conn.judging = false;
            if let Some(frozen) = conn.frozen.take() {
                conn.from_client = super::judge::reclaim(frozen);
            }
            conn.frontend.judged();
            let ended = catch_panic(span, || match conn.client_sent(&[]) {
                Some(end) => Some(end),
                None if conn.frontend.pending.is_some() => None,
                None => conn.pump(scratch),
            });
            self.settle(slot, ended);
        }
    }

    /// Takes a session off the loop and gives it back to its task.
    fn release(&mut self, slot: usize, ending: Ending) {
        let Some((_, mut conn)) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut SourceFd(&conn.client.as_raw_fd()));
        let _ = registry.deregister(&mut SourceFd(&conn.upstream.as_raw_fd()));
        self.by_id.remove(&conn.id);
        self.free.push(slot);
        conn.ending = Some(ending);
        if let Some(done) = conn.done.take() {
            // The task may be gone (runtime shutting down): then dropping the sockets closes them.
            let _ = done.send(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits up to 5 s for a relay thread to end.
    fn ends(thread: std::thread::JoinHandle<()>) -> bool {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = thread.join();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5)).is_ok()
    }

    #[test]
    fn a_stop_sent_just_before_the_last_handle_goes_still_ends_the_thread() {
        // The thread has usually not reached epoll_wait yet when the handle goes: the wake-up must survive.
        for _ in 0..20 {
            let (handle, thread) = Handle::start("relay-test".into()).unwrap();
            handle.stop();
            drop(handle);
            assert!(ends(thread), "the relay thread did not stop");
        }
    }

    #[test]
    fn dropping_every_handle_ends_the_thread() {
        let (handle, thread) = Handle::start("relay-test".into()).unwrap();
        let other = handle.clone();
        drop(handle);
        std::thread::sleep(Duration::from_millis(20));
        drop(other);
        assert!(ends(thread), "the relay thread outlived its handles");
    }
}
