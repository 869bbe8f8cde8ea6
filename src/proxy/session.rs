//! One client connection: startup negotiation, the upstream connection, then the relay in both directions
//! until either side ends, and the closing reply.
//!
//! Plain-TCP sessions on a worker runtime are relayed by that worker's epoll relay ([`super::epoll_relay`]); this
//! task waits for it and finishes the session. TLS sessions, and every session under `--workers 0`, are
//! relayed here: both directions run as two futures of one task, so a client that pipelines faster than it
//! reads can never deadlock the proxy (each direction blocks only on its own socket). Both relays drive the
//! same sans-IO directions ([`super::flow`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{info, warn};

use super::async_relay;
use super::ending::finish;
use super::epoll_relay;
use super::flow::Ending;
use super::gate::SessionState;
use super::shared::{SessionSummary, Shared};
use super::stream::{send_and_close, ClientStream, MaybeTls};
use super::upstream;
use crate::gate::SessionFields;
use crate::wire::reply::ErrorReply;
use crate::wire::startup::StartupMessage;

#[allow(clippy::too_many_arguments)]
pub(super) async fn session(
    shared: &Arc<Shared>,
    relay_thread: Option<&epoll_relay::Handle>,
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
    let settings = match startup.take_stepgate_settings().and_then(|s| {
        // A typo (`stepgate.tokn`) must not read as a session with a token.
        if let Some((name, _)) = s.iter().find(|(n, _)| n != "stepgate.token") {
            return Err(crate::wire::startup::StartupError::UnknownSetting(
                name.chars()
                    .take(64)
                    .map(|c| if c.is_ascii_graphic() { c } else { '_' })
                    .collect(),
            ));
        }
        // What PostgreSQL will read must fit its own limit; only stepgate's settings may go past it.
        let forwarded = startup.encode().len();
        if forwarded > crate::wire::startup::MAX_STARTUP_LEN {
            return Err(crate::wire::startup::StartupError::TooLongForServer(
                forwarded,
            ));
        }
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            // Too long for the server is what PostgreSQL itself would answer with 08P01.
            let code = match e {
                crate::wire::startup::StartupError::TooLongForServer(_) => "08P01",
                crate::wire::startup::StartupError::UnknownSetting(_) => "42704",
                _ => "42501",
            };
            send_and_close(
                &mut client,
                &ErrorReply::fatal(code, format!("stepgate: {e}")),
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
            let state = Arc::new(std::sync::Mutex::new(state));
            let (mut cr, mut cw) = c.split();
            let (mut ur, mut uw) = u.split();
            async_relay::relay(
                shared, &mut cr, &mut cw, &mut ur, &mut uw, leftover, deadline, client_tls, &state,
            )
            .await
        }
        (c, u, _) => {
            let state = Arc::new(std::sync::Mutex::new(state));
            let (mut cr, mut cw) = tokio::io::split(c);
            let (mut ur, mut uw) = tokio::io::split(u);
            async_relay::relay(
                shared, &mut cr, &mut cw, &mut ur, &mut uw, leftover, deadline, client_tls, &state,
            )
            .await
        }
    }
    info!(%user, %database, tls = client_tls, "session ended");
}

/// How long the end of a session waits for a peer to take what was still queued for it.
const LEFTOVER_WRITE: Duration = Duration::from_secs(5);

/// Runs a plain-TCP session on the epoll relay ([`super::epoll_relay`]) and finishes it when the relay gives it
/// back.
#[allow(clippy::too_many_arguments)]
async fn relayed(
    shared: &Arc<Shared>,
    relay: &epoll_relay::Handle,
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
    let (conn, done) = epoll_relay::Conn::new(
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
    // What a leg could not take yet goes first, for a bounded time: a peer that stopped reading (a server
    // blocked writing replies to a client that left) is not waited for; closing the connection ends it.
    // The client hears why only at a message boundary.
    if !conn.to_upstream.is_empty() {
        let _ = tokio::time::timeout(LEFTOVER_WRITE, up.write_all(&conn.to_upstream)).await;
    }
    let at_boundary = conn.backend.at_boundary()
        && (conn.to_client.is_empty()
            || matches!(
                tokio::time::timeout(LEFTOVER_WRITE, client.write_all(&conn.to_client)).await,
                Ok(Ok(()))
            ));
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
