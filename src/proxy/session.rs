//! One client connection: startup negotiation, the upstream connection, then the relay in both directions
//! until either side ends, and the closing reply.
//!
//! Plain-TCP sessions on a worker runtime are relayed by that worker's epoll relay ([`super::relay`]); this
//! task waits for it and finishes the session. TLS sessions, and every session under `--workers 0`, are
//! relayed here: both directions run as two futures of one task, so a client that pipelines faster than it
//! reads can never deadlock the proxy (each direction blocks only on its own socket). Both relays drive the
//! same sans-IO directions ([`super::flow`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

use super::flow::{Backend, Flags, Frontend, FrontendError};
use super::gate::SessionState;
use super::stream::{ClientStream, MaybeTls};
use super::{console, relay, upstream, SessionSummary, Shared};
use crate::gate::SessionFields;
use crate::wire::reply::ErrorReply;
use crate::wire::startup::{self, StartupError, StartupMessage, StartupPacket};

/// How much to ask the kernel for per read.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, Error)]
enum NegotiateError {
    #[error("{0}")]
    Startup(#[from] StartupError),
    #[error("received unencrypted data after SSL request")]
    DataAfterSslRequest,
    #[error("a second SSL request")]
    RepeatedSslRequest,
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("client closed the connection during startup")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the startup negotiation produced.
enum Opening {
    Session {
        client: ClientStream,
        startup: StartupMessage,
        leftover: BytesMut,
    },
    Cancel {
        pid: i32,
        key: i32,
        raw: [u8; 16],
    },
}

/// Entry point of a connection's task.
pub(crate) async fn run(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
    admin_address: bool,
    relay: Option<relay::Handle>,
) {
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("session", id, peer = %peer);
    async move {
        let _ = tcp.set_nodelay(true);
        let deadline = Instant::now() + shared.config.startup_timeout;
        let opening = tokio::select! {
            r = negotiate(&shared, tcp) => r,
            _ = tokio::time::sleep_until(deadline) => {
                debug!("no startup packet before startup_timeout");
                return;
            }
        };
        match opening {
            Ok(Opening::Cancel { pid, key, raw }) => relay_cancel(&shared, pid, key, raw).await,
            Ok(Opening::Session {
                mut client,
                startup,
                leftover,
            }) => {
                if permit.is_none() {
                    let err = ErrorReply::fatal("53300", "sorry, too many clients already")
                        .with_detail(format!(
                            "stepgate accepts at most {} connections (max_connections)",
                            shared.config.max_connections
                        ));
                    send_and_close(&mut client, &err).await;
                    warn!("refused a client: max_connections reached");
                    return;
                }
                let console = startup.database() == console::CONSOLE_DB;
                if admin_address && !console {
                    let err = ErrorReply::fatal(
                        "3D000",
                        "stepgate: only the console (database \"stepgate\") is served on this address",
                    );
                    send_and_close(&mut client, &err).await;
                } else if console
                    && shared
                        .config
                        .admin
                        .as_ref()
                        .is_some_and(|a| a.listen.is_none() || admin_address)
                {
                    console::run(&shared, client, startup, leftover, peer).await;
                } else {
                    session(
                        &shared,
                        relay.as_ref(),
                        client,
                        startup,
                        leftover,
                        deadline,
                        peer,
                        id,
                    )
                    .await;
                }
            }
            Err(NegotiateError::Closed) => debug!("client closed before startup"),
            Err(e) => warn!(error = %e, "startup rejected"),
        }
        drop(permit);
    }
    .instrument(span)
    .await
}

/// Reads untagged packets until a StartupMessage or CancelRequest, answering SSL and GSS requests.
async fn negotiate(shared: &Shared, tcp: TcpStream) -> Result<Opening, NegotiateError> {
    let mut client: ClientStream = MaybeTls::Plain(tcp);
    let mut buf = BytesMut::with_capacity(1024);
    let mut ssl_requested = false;
    loop {
        let parsed = match startup::parse(&buf) {
            Ok(p) => p,
            Err(e) => {
                let code = match e {
                    StartupError::UnsupportedProtocol(..) => "0A000",
                    _ => "08P01",
                };
                send_and_close(
                    &mut client,
                    &ErrorReply::fatal(code, format!("stepgate: {e}")),
                )
                .await;
                return Err(e.into());
            }
        };
        let Some((packet, used)) = parsed else {
            // Bounded: parse() rejects a declared length above MAX_STARTUP_LEN before we get here.
            buf.reserve(1024);
            if client.read_buf(&mut buf).await? == 0 {
                return Err(NegotiateError::Closed);
            }
            continue;
        };
        buf.advance(used);
        match packet {
            StartupPacket::Ssl => {
                if ssl_requested || client.is_tls() {
                    return Err(NegotiateError::RepeatedSslRequest);
                }
                ssl_requested = true;
                // CVE-2021-23214: bytes sent before the handshake must not be read as if encrypted.
                if !buf.is_empty() {
                    return Err(NegotiateError::DataAfterSslRequest);
                }
                let MaybeTls::Plain(mut tcp) = client else {
                    unreachable!("checked above")
                };
                match &shared.tls_acceptor {
                    Some(acceptor) => {
                        tcp.write_all(b"S").await?;
                        let tls = acceptor
                            .accept(tcp)
                            .await
                            .map_err(NegotiateError::Handshake)?;
                        client = MaybeTls::Tls(Box::new(tls));
                    }
                    None => {
                        tcp.write_all(b"N").await?;
                        client = MaybeTls::Plain(tcp);
                    }
                }
            }
            StartupPacket::GssEnc => {
                if !buf.is_empty() {
                    return Err(NegotiateError::DataAfterSslRequest);
                }
                client.write_all(b"N").await?;
            }
            StartupPacket::Cancel { pid, key, raw } => {
                return Ok(Opening::Cancel { pid, key, raw });
            }
            StartupPacket::Startup(startup) => {
                return Ok(Opening::Session {
                    client,
                    startup,
                    leftover: buf,
                });
            }
        }
    }
}

/// Relays a CancelRequest to the upstream, but only for a key one of our sessions handed out.
async fn relay_cancel(shared: &Shared, pid: i32, key: i32, raw: [u8; 16]) {
    if !shared.cancel_keys.contains_key(&(pid, key)) {
        debug!(pid, "cancel request for an unknown key ignored");
        return;
    }
    match upstream::connect(shared, shared.config.startup_timeout).await {
        Ok(mut up) => {
            if let Err(e) = up.write_all(&raw).await {
                warn!(error = %e, "could not relay the cancel request");
                return;
            }
            let _ = up.flush().await;
            // The server closes the connection once it has processed the request.
            let mut sink = [0u8; 16];
            let _ = tokio::time::timeout(Duration::from_secs(5), up.read(&mut sink)).await;
            info!(pid, "cancel request relayed");
        }
        Err(e) => warn!(error = %e, "could not relay the cancel request"),
    }
}

pub(super) async fn send_and_close<W: AsyncWrite + Unpin>(w: &mut W, err: &ErrorReply) {
    let _ = w.write_all(&err.to_bytes()).await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

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

#[allow(clippy::too_many_arguments)]
async fn session(
    shared: &Arc<Shared>,
    relay_thread: Option<&relay::Handle>,
    mut client: ClientStream,
    mut startup: StartupMessage,
    leftover: BytesMut,
    deadline: Instant,
    peer: SocketAddr,
    session_id: u64,
) {
    let user = startup.user();
    let database = startup.database();
    let application_name = startup.get_lossy("application_name");
    if let Some(tls) = &shared.config.tls {
        if tls.required && !client.is_tls() {
            let err = ErrorReply::fatal("28000", "stepgate: TLS is required")
                .with_hint("connect with sslmode=require");
            send_and_close(&mut client, &err).await;
            info!(%user, %database, "refused a plaintext client (tls.required)");
            return;
        }
    }
    let settings = match startup.take_stepgate_settings() {
        Ok(s) => s,
        Err(e) => {
            send_and_close(
                &mut client,
                &ErrorReply::fatal("42501", format!("stepgate: {e}")),
            )
            .await;
            warn!(%user, %database, error = %e, "startup refused");
            return;
        }
    };
    info!(
        %user, %database, %application_name,
        tls = client.is_tls(),
        stepgate_settings = settings.len(),
        "client connected"
    );
    let remaining = deadline.saturating_duration_since(Instant::now());
    let mut up = match upstream::connect(shared, remaining.max(Duration::from_millis(1))).await {
        Ok(up) => up,
        Err(e) => {
            shared
                .gate
                .load()
                .metrics
                .upstream_connect_failures
                .fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "upstream connection failed");
            send_and_close(
                &mut client,
                &ErrorReply::fatal("08006", format!("stepgate: {e}")),
            )
            .await;
            return;
        }
    };
    if let Err(e) = up.write_all(&startup.encode()).await {
        let err = ErrorReply::fatal("08006", format!("stepgate: upstream write failed: {e}"));
        send_and_close(&mut client, &err).await;
        return;
    }
    let _ = up.flush().await;
    let fields = SessionFields {
        user: user.clone(),
        database: database.clone(),
        client_addr: peer.ip().to_string(),
        application_name: application_name.clone(),
        session_id,
    };
    let rule = shared.gate.load().config.rule_for(&database, &user);
    let metrics = shared.gate.load().metrics.clone();
    metrics.sessions_total.fetch_add(1, Ordering::Relaxed);
    metrics.sessions_open.fetch_add(1, Ordering::Relaxed);
    shared.sessions.insert(
        session_id,
        SessionSummary {
            user: user.clone(),
            database: database.clone(),
            client_addr: peer.ip().to_string(),
            application_name: application_name.clone(),
            tls: client.is_tls(),
            connected: crate::audit::now_rfc3339(),
        },
    );
    // Counts the session as closed however this function returns.
    struct Open<'a>(std::sync::Arc<crate::metrics::Metrics>, &'a Shared, u64);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            self.0.sessions_open.fetch_sub(1, Ordering::Relaxed);
            self.1.sessions.remove(&self.2);
        }
    }
    let _open = Open(metrics, shared, session_id);
    let state = SessionState::new(fields, rule, settings);
    let client_tls = client.is_tls();
    match (client, up, relay_thread) {
        // Plain TCP on both legs (the common case): the epoll relay of this worker runs the session.
        (MaybeTls::Plain(c), MaybeTls::Plain(u), Some(relay)) => {
            relayed(shared, relay, c, u, leftover, deadline, state, session_id).await
        }
        (MaybeTls::Plain(mut c), MaybeTls::Plain(mut u), None) => {
            let state = std::sync::Mutex::new(state);
            let (mut cr, mut cw) = c.split();
            let (mut ur, mut uw) = u.split();
            relay(
                shared, &mut cr, &mut cw, &mut ur, &mut uw, leftover, deadline, client_tls, &state,
            )
            .await
        }
        (c, u, _) => {
            let state = std::sync::Mutex::new(state);
            let (mut cr, mut cw) = tokio::io::split(c);
            let (mut ur, mut uw) = tokio::io::split(u);
            relay(
                shared, &mut cr, &mut cw, &mut ur, &mut uw, leftover, deadline, client_tls, &state,
            )
            .await
        }
    }
    info!(%user, %database, tls = client_tls, "session ended");
}

/// Runs a plain-TCP session on the epoll relay ([`super::relay`]) and finishes it when the relay gives it
/// back.
#[allow(clippy::too_many_arguments)]
async fn relayed(
    shared: &Arc<Shared>,
    relay: &relay::Handle,
    client: TcpStream,
    up: TcpStream,
    leftover: BytesMut,
    deadline: Instant,
    state: SessionState,
    session_id: u64,
) {
    let (client, up) = match (client.into_std(), up.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "cannot hand the session to the relay");
            return;
        }
    };
    let (conn, done) = relay::Conn::new(
        session_id,
        shared.clone(),
        client,
        up,
        leftover,
        deadline.into_std(),
        state,
    );
    if let Err(conn) = relay.adopt(conn) {
        warn!("the relay thread is gone; session refused");
        if let Ok(mut c) = TcpStream::from_std(conn.client) {
            let err = ErrorReply::fatal("08006", "stepgate: the relay thread is gone");
            send_and_close(&mut c, &err).await;
        }
        return;
    }
    let force_close = shared.force_close.child_token();
    tokio::pin!(done);
    let given_back = tokio::select! {
        biased;
        r = &mut done => r,
        _ = force_close.cancelled() => {
            relay.close(session_id);
            done.await
        }
    };
    let Ok(conn) = given_back else {
        warn!("the relay thread ended under a session");
        return;
    };
    let mut conn = *conn;
    let ending = conn.ending.take().unwrap_or(Ending::Shutdown);
    let (Ok(mut client), Ok(mut up)) = (
        TcpStream::from_std(conn.client),
        TcpStream::from_std(conn.upstream),
    ) else {
        return;
    };
    // What a leg could not take yet goes first; the client hears why only at a message boundary.
    if !conn.to_upstream.is_empty() {
        let _ = up.write_all(&conn.to_upstream).await;
    }
    let at_boundary = conn.backend.at_boundary()
        && (conn.to_client.is_empty() || client.write_all(&conn.to_client).await.is_ok());
    conn.flags
        .client_at_boundary
        .store(at_boundary, Ordering::Relaxed);
    finish(
        shared,
        ending,
        &conn.flags,
        &conn.backend.keys,
        &conn.state,
        &mut client,
        &mut up,
    )
    .await;
}

/// Both directions of a logged-in (or logging-in) session until one ends, then the closing reply.
#[allow(clippy::too_many_arguments)]
async fn relay<CR, CW, UR, UW>(
    shared: &Shared,
    client_rd: &mut CR,
    client_wr: &mut CW,
    up_rd: &mut UR,
    up_wr: &mut UW,
    leftover: BytesMut,
    deadline: Instant,
    client_tls: bool,
    state: &std::sync::Mutex<SessionState>,
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

/// The end of a session, however its relay ran: forgets its cancel keys, settles its gate state, tells the
/// client why (when the reason is ours and the client is at a message boundary) and closes both legs.
pub(super) async fn finish<CW, UW>(
    shared: &Shared,
    ending: Ending,
    flags: &Flags,
    keys: &[(i32, i32)],
    state: &std::sync::Mutex<SessionState>,
    client_wr: &mut CW,
    up_wr: &mut UW,
) where
    CW: AsyncWrite + Unpin,
    UW: AsyncWrite + Unpin,
{
    for k in keys {
        shared.cancel_keys.remove(k);
    }
    state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .on_session_end(&shared.gate.load());
    let at_boundary = flags.client_at_boundary.load(Ordering::Relaxed);
    let reply = match ending {
        Ending::Frontend(Ok(FrontendEnd::Terminate)) => {
            debug!("client terminated the session");
            None
        }
        Ending::Frontend(Ok(FrontendEnd::Eof)) => {
            debug!("client closed the connection");
            None
        }
        Ending::Frontend(Err(FrontendError::ClientIo(e))) => {
            debug!(error = %e, "client connection failed");
            None
        }
        Ending::Frontend(Err(FrontendError::UpstreamIo(e))) => Some(ErrorReply::fatal(
            "08006",
            format!("stepgate: lost the upstream connection: {e}"),
        )),
        Ending::Frontend(Err(FrontendError::Frame(e))) => {
            warn!(error = %e, "protocol violation by the client");
            Some(ErrorReply::fatal(
                "08P01",
                format!("stepgate: invalid frontend message: {e}"),
            ))
        }
        Ending::Frontend(Err(e @ FrontendError::BeforeLogin(_))) => {
            warn!(error = %e, "message before login refused");
            Some(
                ErrorReply::fatal("08P01", format!("stepgate: {e}"))
                    .with_hint("wait for ReadyForQuery before sending queries: stepgate does not forward messages pipelined behind the login"),
            )
        }
        Ending::Frontend(Err(e @ FrontendError::ChannelBinding(_))) => {
            warn!(error = %e, "channel binding refused");
            Some(
                ErrorReply::fatal("28000", format!("stepgate: {e}"))
                    .with_hint("connect with channel_binding=disable: the client's TLS session ends at stepgate, so the server cannot bind to it"),
            )
        }
        Ending::Backend(Ok(BackendEnd::LoginFailed)) => {
            info!("login refused by the upstream server");
            None
        }
        Ending::Backend(r) => {
            if flags.client_terminated.load(Ordering::Acquire)
                || flags.upstream_fatal.load(Ordering::Acquire)
            {
                None
            } else {
                let why = match r {
                    Err(e) => e.to_string(),
                    Ok(_) => "connection closed".to_string(),
                };
                warn!(error = %why, "upstream connection lost");
                Some(ErrorReply::fatal(
                    "08006",
                    format!(
                        "stepgate: lost the connection to the upstream server at {}: {why}",
                        shared.config.upstream
                    ),
                ))
            }
        }
        Ending::LoginTimeout => Some(ErrorReply::fatal(
            "57014",
            format!(
                "stepgate: canceling authentication due to timeout (startup_timeout = {:?})",
                shared.config.startup_timeout
            ),
        )),
        Ending::Shutdown => Some(ErrorReply::fatal(
            "57P01",
            "stepgate: terminating connection because stepgate is shutting down",
        )),
        Ending::Internal => Some(ErrorReply::fatal(
            "XX000",
            "stepgate: internal error while relaying; this session was closed (see stepgate's log)",
        )),
    };
    if let Some(reply) = reply {
        if at_boundary {
            let _ = client_wr.write_all(&reply.to_bytes()).await;
            let _ = client_wr.flush().await;
        }
    }
    let _ = client_wr.shutdown().await;
    let _ = up_wr.shutdown().await;
}

/// Client → upstream.
async fn frontend<R, W>(
    rd: &mut R,
    wr: &mut W,
    mut buf: BytesMut,
    flags: &Flags,
    shared: &Shared,
    state: &std::sync::Mutex<SessionState>,
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
        if let Some(job) = flow.pending.take() {
            // A large statement is judged off this runtime's threads; then the same bytes are fed again.
            let (tx, rx) = tokio::sync::oneshot::channel();
            shared.judges.submit(Box::new(move || {
                job();
                let _ = tx.send(());
            }));
            let _ = rx.await;
            flow.judged();
            continue;
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
    state: &std::sync::Mutex<SessionState>,
) -> Result<BackendEnd, std::io::Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = BytesMut::new();
    loop {
        buf.reserve(READ_CHUNK);
        if rd.read_buf(&mut buf).await? == 0 {
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
