//! The tokio relay: TLS sessions, and every session under `--workers 0`. Both directions run as two futures of
//! one task, so a client that pipelines faster than it reads can never deadlock the proxy (each direction
//! blocks only on its own socket). It drives the same sans-IO directions as the epoll relay ([`super::flow`]).

use std::sync::atomic::Ordering;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::ending::finish;
use super::flow::{
    Backend, BackendEnd, Ending, Flags, Frontend, FrontendEnd, FrontendError, READ_CHUNK,
};
use super::gate::SessionState;
use super::shared::Shared;

/// Both directions of a logged-in (or logging-in) session until one ends, then the closing reply.
#[allow(clippy::too_many_arguments)]
pub(super) async fn relay<CR, CW, UR, UW>(
    shared: &Shared,
    client_rd: &mut CR,
    client_wr: &mut CW,
    up_rd: &mut UR,
    up_wr: &mut UW,
    leftover: BytesMut,
    deadline: Instant,
    client_tls: bool,
    state: &std::sync::Arc<std::sync::Mutex<SessionState>>,
) where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let flags = Flags::new();
    let mut flow = Backend::new(client_tls);
    let ending = {
        let fe = frontend(client_rd, up_wr, leftover, &flags, shared, state);
        let be = backend(up_rd, client_wr, &flags, shared, &mut flow, state);
        tokio::pin!(fe, be);
        // A child token per session: polling the server-wide token on every wake would lock one mutex
        // shared by every session.
        let force_close = shared.force_close.child_token();
        let closing = force_close.cancelled();
        tokio::pin!(closing);
        // Two phases, so the login timer is gone once the login is (it would be polled on every wake).
        // `biased`: both directions are polled on every wake anyway; a fixed order saves the random draw.
        let login = async {
            tokio::select! {
                biased;
                _ = flags.login_done.notified() => true,
                _ = tokio::time::sleep_until(deadline) => flags.logged_in.load(Ordering::Acquire),
            }
        };
        let first = tokio::select! {
            biased;
            r = &mut fe => Some(Ending::Frontend(r)),
            r = &mut be => Some(Ending::Backend(r)),
            ok = login => (!ok).then_some(Ending::LoginTimeout),
            _ = &mut closing => Some(Ending::Shutdown),
        };
        match first {
            Some(ending) => ending,
            None => tokio::select! {
                biased;
                r = &mut fe => Ending::Frontend(r),
                r = &mut be => Ending::Backend(r),
                _ = &mut closing => Ending::Shutdown,
            },
        }
    };
    finish(shared, ending, &flags, &flow.keys, state, client_wr, up_wr).await;
}

/// The most a client may send behind a statement that waits for an approval and still be watched for
/// leaving (what it sends is kept until the wait is over).
const WATCH_LIMIT: usize = 64 * 1024;

/// Client → upstream.
async fn frontend<R, W>(
    rd: &mut R,
    wr: &mut W,
    mut buf: BytesMut,
    flags: &Flags,
    shared: &Shared,
    state: &std::sync::Arc<std::sync::Mutex<SessionState>>,
) -> Result<FrontendEnd, FrontendError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut flow = Frontend::new();
    let mut out = BytesMut::new();
    loop {
        let (used, terminate) = flow.feed(&buf, flags, shared, state, &mut |b| {
            out.extend_from_slice(b)
        })?;
        buf.advance(used);
        if buf.is_empty() && buf.capacity() > super::judge::TRIM_AFTER_BYTES {
            // A large message's buffer is not kept for the rest of the session.
            buf = BytesMut::new();
        }
        if !out.is_empty() {
            wr.write_all(&out)
                .await
                .map_err(FrontendError::UpstreamIo)?;
            wr.flush().await.map_err(FrontendError::UpstreamIo)?;
            out.clear();
        }
        if terminate {
            return Ok(FrontendEnd::Terminate);
        }
        if let Some(work) = flow.pending.take() {
            // A large statement is judged off this runtime's threads, sharing the buffer (whose front is the
            // message); then the same bytes are fed again.
            let frozen = std::mem::take(&mut buf).freeze();
            let waits = work.waits();
            let mut watching = waits.is_some();
            let job = work.bind(&frozen);
            let (tx, rx) = tokio::sync::oneshot::channel();
            // If the job panics (a bug), `tx` is dropped with it and the await ends all the same.
            shared.judges.submit_for(
                waits,
                Box::new(move || {
                    job();
                    let _ = tx.send(());
                }),
            );
            // While a statement waits for an approval the client is watched: if it leaves, the wait ends (an
            // approval must not run the statement for nobody). What it sends meanwhile is kept for after,
            // up to WATCH_LIMIT; past that it is not read (nor watched) until the wait is over.
            let mut extra = BytesMut::new();
            let mut rx = rx;
            loop {
                if watching {
                    extra.reserve(8 * 1024);
                }
                tokio::select! {
                    biased;
                    _ = &mut rx => break,
                    r = rd.read_buf(&mut extra), if watching && extra.len() < WATCH_LIMIT => {
                        if !matches!(r, Ok(n) if n > 0) {
                            watching = false;
                            flags.cancel_wait.store(true, Ordering::Release);
                            shared.gate.load().approvals.nudge();
                        }
                    }
                }
            }
            buf = super::judge::reclaim(frozen);
            buf.extend_from_slice(&extra);
            flow.judged();
            continue;
        }
        // Back-pressure: a client waiting for more replies than the bound (it pipelines without reading) is
        // not read until the server's replies bring the queue down.
        while state.lock().map_or(0, |s| s.queued()) >= super::gate::MAX_QUEUED {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        buf.reserve(READ_CHUNK);
        let n = rd
            .read_buf(&mut buf)
            .await
            .map_err(FrontendError::ClientIo)?;
        if n == 0 {
            return Ok(FrontendEnd::Eof);
        }
    }
}

/// Upstream → client.
async fn backend<R, W>(
    rd: &mut R,
    wr: &mut W,
    flags: &Flags,
    shared: &Shared,
    flow: &mut Backend,
    state: &std::sync::Arc<std::sync::Mutex<SessionState>>,
) -> Result<BackendEnd, std::io::Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = BytesMut::new();
    loop {
        buf.reserve(READ_CHUNK);
        let n = tokio::select! {
            biased;
            n = rd.read_buf(&mut buf) => n?,
            // A held statement now waits for an approval: the client hears why at once (between messages:
            // everything fed so far has been written).
            _ = flags.notice_ready.notified() => {
                if let Some(notice) = flags.take_notice(flow.at_boundary()) {
                    wr.write_all(&notice).await?;
                    wr.flush().await?;
                }
                continue;
            }
        };
        if n == 0 {
            return Ok(BackendEnd::Eof);
        }
        let (used, login_failed) = flow
            .feed(&buf, flags, shared, state, &mut |b| {
                out.extend_from_slice(b)
            })
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        buf.advance(used);
        if !out.is_empty() {
            flags.client_at_boundary.store(false, Ordering::Relaxed);
            wr.write_all(&out).await?;
            wr.flush().await?;
            out.clear();
            flags
                .client_at_boundary
                .store(flow.at_boundary(), Ordering::Relaxed);
        }
        if login_failed {
            return Ok(BackendEnd::LoginFailed);
        }
    }
}
