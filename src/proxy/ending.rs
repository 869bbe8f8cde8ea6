//! The end of a proxied session: what was still queued is written, the client is told why the session ended
//! (or the upstream's FATAL is passed on), the server is told `Terminate`, and the token uses of an open
//! transaction are settled.

use std::sync::atomic::Ordering;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::flow::{BackendEnd, Ending, Flags, FrontendEnd, FrontendError};
use super::gate::SessionState;
use super::shared::Shared;
use crate::wire::reply::ErrorReply;

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
    if matches!(ending, Ending::Shutdown) {
        // Closed by stepgate (the shutdown timeout): what the server is running for this session is
        // cancelled first, so it does not go on and commit after the client is told the session is over.
        for (pid, key) in keys {
            super::upstream::cancel_backend(shared, *pid, *key, std::time::Duration::from_secs(5))
                .await;
        }
    }
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
        Ending::Frontend(Err(e @ FrontendError::Internal(_))) => {
            tracing::error!(error = %e, "the session is closed");
            Some(ErrorReply::fatal(
                "XX000",
                "stepgate: internal error while relaying; this session was closed (see stepgate's log)",
            ))
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
            // A client that does not read is not waited for.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                let _ = client_wr.write_all(&reply.to_bytes()).await;
                let _ = client_wr.flush().await;
            })
            .await;
        }
    }
    let _ = client_wr.shutdown().await;
    let _ = up_wr.shutdown().await;
}
