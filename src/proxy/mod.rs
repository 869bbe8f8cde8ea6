//! The listener and the per-connection session tasks.
//!
//! [`Server::bind`] opens the listen socket; [`Server::run`] accepts connections until its shutdown token
//! is cancelled, then stops accepting and lets open sessions finish for up to `shutdown_timeout` before
//! closing them with an error. Each connection holds one permit of a semaphore sized `max_connections`;
//! a connection beyond it completes the startup handshake and is refused with SQLSTATE 53300.

pub mod authz;
mod session;
pub mod state;
mod stream;
pub mod tls;
mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use dashmap::DashMap;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, UpstreamTls};

pub use upstream::UpstreamError;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("token policy: {0}")]
    Policy(String),
}

/// Options of `serve` that are deliberately not in the config file.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    /// Classify and hold nothing (`--unsafe-no-gate`, for measuring the gate's own cost).
    pub unsafe_no_gate: bool,
}

/// State shared by every session of one server.
pub(crate) struct Shared {
    pub config: Config,
    pub tls_acceptor: Option<TlsAcceptor>,
    pub upstream_tls: Option<TlsConnector>,
    /// BackendKeyData of open sessions: a CancelRequest is relayed only for a key stepgate handed out.
    pub cancel_keys: DashMap<(i32, i32), ()>,
    /// Cancelled when open sessions must end (after `shutdown_timeout`).
    pub force_close: CancellationToken,
    pub next_session: AtomicU64,
    pub gate: state::GateContext,
}

/// A bound, not yet running, stepgate proxy.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    /// Validates TLS material, creates the state directory and binds the listen address.
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
        Self::bind_with(config, ServeOptions::default()).await
    }

    /// [`Server::bind`] with options that are not part of the config file.
    pub async fn bind_with(config: Config, options: ServeOptions) -> Result<Server, ServeError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| ServeError::StateDir {
            path: config.state_dir.display().to_string(),
            source,
        })?;
        let policy = crate::token::Policy::load(&config).map_err(ServeError::Policy)?;
        let audit = std::sync::Arc::new(crate::audit::AuditLog::open(&config.state_dir)?);
        let registry = crate::gate::Registry::new(Some(audit.clone()));
        let records = crate::audit::AuditLog::read_dir(&config.state_dir)?;
        registry.restore(&records);
        let ledger = crate::token::Ledger::default();
        ledger.restore(&records);
        drop(records);
        if options.unsafe_no_gate {
            warn!("--unsafe-no-gate: NOTHING is classified or held; use this only to measure the gate's cost");
            let mut f = serde_json::Map::new();
            f.insert(
                "reason".into(),
                "serve --unsafe-no-gate: the gate is off".into(),
            );
            audit.append("gate_disabled", f, true)?;
        }
        let gate = state::GateContext::new(config.clone(), registry, options.unsafe_no_gate)
            .with_tokens(policy, ledger, audit);
        let tls_acceptor = config.tls.as_ref().map(tls::acceptor).transpose()?;
        let upstream_tls = match config.upstream_tls {
            UpstreamTls::Disable => None,
            UpstreamTls::Prefer | UpstreamTls::Require => Some(tls::upstream_connector()?),
        };
        let listener = TcpListener::bind(config.listen.as_str())
            .await
            .map_err(|source| ServeError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                config,
                tls_acceptor,
                upstream_tls,
                cancel_keys: DashMap::new(),
                force_close: CancellationToken::new(),
                next_session: AtomicU64::new(1),
                gate,
            }),
        })
    }

    /// The held registry (for tests and the console).
    pub fn registry(&self) -> &crate::gate::Registry {
        &self.shared.gate.registry
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Accepts connections until `shutdown` is cancelled, then drains sessions (see module docs).
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared;
        let permits = Arc::new(Semaphore::new(shared.config.max_connections));
        let tracker = TaskTracker::new();
        info!(
            listen = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            upstream = %shared.config.upstream,
            mode = shared.gate.mode.as_str(),
            "stepgate is accepting connections"
        );
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let permit = permits.clone().try_acquire_owned().ok();
            tracker.spawn(session::run(shared.clone(), tcp, peer, permit));
        }
        drop(self.listener);
        tracker.close();
        let open = tracker.len();
        if open > 0 {
            info!(
                sessions = open,
                timeout = ?shared.config.shutdown_timeout,
                "shutting down: waiting for open sessions to finish"
            );
        }
        if tokio::time::timeout(shared.config.shutdown_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                sessions = tracker.len(),
                "shutdown timeout reached: closing the remaining sessions"
            );
            shared.force_close.cancel();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tracker.wait()).await;
        }
        info!("stepgate stopped");
    }
}
