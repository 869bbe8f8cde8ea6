//! A new connection: the startup negotiation (SSL and GSS requests, TLS), a CancelRequest relayed to the
//! server, and the routing of a startup packet to the console or to a proxied session.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

use super::console;
use super::epoll_relay;
use super::session::session;
use super::shared::Shared;
use super::stream::{send_and_close, ClientStream, MaybeTls};
use super::upstream;
use crate::wire::reply::ErrorReply;
use crate::wire::startup::{self, StartupError, StartupMessage, StartupPacket};

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
    relay: Option<epoll_relay::Handle>,
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
                    // Whether there is a console is policy (a reload may add `[admin]`); where it listens is not.
                    && shared.gate.load().config.admin.is_some()
                    && (admin_address
                        || shared.config.admin.as_ref().is_none_or(|a| a.listen.is_none()))
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
            // Bounded: parse() rejects a declared length above MAX_STARTUP_WITH_SETTINGS before we get here.
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
    let Some(wait) = shared.cancel_keys.get(&(pid, key)).map(|f| f.clone()) else {
        debug!(pid, "cancel request for an unknown key ignored");
        return;
    };
    // A statement of that session waiting for an approval gives up (the server has nothing to cancel then).
    wait.store(true, std::sync::atomic::Ordering::Release);
    shared.gate.load().approvals.nudge();
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
