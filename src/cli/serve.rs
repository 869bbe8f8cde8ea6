//! What `stepgate serve` does beside the server: signals (SIGHUP reloads, SIGTERM/SIGINT drain).

use tokio_util::sync::CancellationToken;

/// Reloads the policy on every SIGHUP.
pub async fn reload_on_sighup(handle: stepgate::proxy::ServerHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config and the keyring");
        let _ = handle.reload();
    }
}

/// Cancels `token` on the first SIGTERM or SIGINT.
pub async fn stop_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    token.cancel();
}
