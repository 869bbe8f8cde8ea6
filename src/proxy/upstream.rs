//! Opening a connection to the upstream server, with the TLS negotiation `upstream_tls` asks for.

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::shared::Shared;
use super::stream::{MaybeTls, UpstreamStream};
use crate::config::{split_host_port, UpstreamTls};
use crate::wire::startup::SSL_REQUEST_CODE;

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("could not connect to the upstream server at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("could not connect to the upstream server at {addr}: timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("the upstream server at {addr} does not offer TLS, and upstream_tls = \"require\"")]
    TlsRefused { addr: String },
    #[error("TLS handshake with the upstream server at {addr} failed: {source}")]
    Handshake {
        addr: String,
        source: std::io::Error,
    },
    #[error("the upstream server at {addr} answered the TLS request with {byte:?}")]
    BadTlsAnswer { addr: String, byte: char },
}

/// Connects to `shared.config.upstream` within `timeout`, negotiating TLS as configured.
pub async fn connect(shared: &Shared, timeout: Duration) -> Result<UpstreamStream, UpstreamError> {
    let addr = &shared.config.upstream;
    match tokio::time::timeout(timeout, connect_inner(shared)).await {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::Timeout {
            addr: addr.clone(),
            after: timeout,
        }),
    }
}

async fn connect_inner(shared: &Shared) -> Result<UpstreamStream, UpstreamError> {
    let addr = &shared.config.upstream;
    let io_err = |source| UpstreamError::Connect {
        addr: addr.clone(),
        source,
    };
    let mut tcp = TcpStream::connect(addr.as_str()).await.map_err(io_err)?;
    tcp.set_nodelay(true).map_err(io_err)?;
    let Some(connector) = &shared.upstream_tls else {
        return Ok(MaybeTls::Plain(tcp));
    };
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&8u32.to_be_bytes());
    req[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    tcp.write_all(&req).await.map_err(io_err)?;
    let answer = tcp.read_u8().await.map_err(io_err)?;
    match answer {
        b'S' => {
            let host = split_host_port(addr).map(|(h, _)| h).unwrap_or("localhost");
            let tls = connector
                .connect(super::tls::server_name(host), tcp)
                .await
                .map_err(|source| UpstreamError::Handshake {
                    addr: addr.clone(),
                    source,
                })?;
            Ok(MaybeTls::Tls(Box::new(tls)))
        }
        b'N' if shared.config.upstream_tls == UpstreamTls::Prefer => Ok(MaybeTls::Plain(tcp)),
        b'N' => Err(UpstreamError::TlsRefused { addr: addr.clone() }),
        other => Err(UpstreamError::BadTlsAnswer {
            addr: addr.clone(),
            byte: other as char,
        }),
    }
}

/// Asks the upstream to cancel what backend `pid` is running (a CancelRequest on a new connection), waiting
/// at most `timeout` for the server to take it. Used when stepgate ends a session itself, so a statement it
/// no longer relays does not run on (and commit) after the client was told the session is over.
pub async fn cancel_backend(shared: &Shared, pid: i32, key: i32, timeout: Duration) {
    let mut request = Vec::with_capacity(16);
    request.extend_from_slice(&16u32.to_be_bytes());
    request.extend_from_slice(&crate::wire::startup::CANCEL_REQUEST_CODE.to_be_bytes());
    request.extend_from_slice(&pid.to_be_bytes());
    request.extend_from_slice(&key.to_be_bytes());
    let sent = async {
        let mut up = connect(shared, timeout).await.map_err(|e| e.to_string())?;
        up.write_all(&request).await.map_err(|e| e.to_string())?;
        let _ = up.flush().await;
        // The server closes the connection once it has processed the request.
        let mut sink = [0u8; 16];
        let _ = up.read(&mut sink).await;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(timeout, sent).await {
        Ok(Ok(())) => tracing::info!(
            pid,
            "running statement cancelled: the session was closed by stepgate"
        ),
        Ok(Err(e)) => {
            tracing::warn!(pid, error = %e, "could not cancel the session's running statement")
        }
        Err(_) => tracing::warn!(pid, "cancelling the session's running statement timed out"),
    }
}
