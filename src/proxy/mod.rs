//! The listener and the per-connection session tasks.
//!
//! [`Server::bind`] opens the listen socket; [`Server::run`] accepts connections until its shutdown token
//! is cancelled, then stops accepting and lets open sessions finish for up to `shutdown_timeout` before
//! closing them with an error. Each connection holds one permit of a semaphore sized `max_connections`;
//! a connection beyond it completes the startup handshake and is refused with SQLSTATE 53300.
//!
//! Threads: by default one worker per two CPUs (at least one), each a single-threaded runtime (startup,
//! login, TLS sessions, the console) plus an epoll relay thread that carries its plain-TCP sessions
//! ([`ServeOptions::workers`], [`default_workers`]).

mod accept;
mod async_relay;
pub mod authz;
mod console;
mod ending;
mod epoll_conn;
mod epoll_relay;
mod flow;
pub mod gate;
mod judge;
mod reload;
mod session;
mod shared;
mod stream;
pub mod tls;
mod upstream;
mod waiter;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use dashmap::DashMap;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, UpstreamTls};
pub use reload::ServerHandle;
pub use shared::ServeOptions;
use shared::Shared;

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
    Policy(#[from] crate::token::grant::PolicyError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the judge threads: {0}")]
    Judges(std::io::Error),
    #[error("the audit log is damaged at {0}: stepgate does not start on it, because what ran could no longer be proven. `stepgate audit repair {1}` moves the damaged part aside (nothing is deleted) and records that it did")]
    AuditDamaged(crate::audit::repair::Damage, String),
}

/// The default worker count: one per two CPUs, at least one. A relay thread carries tens of thousands of
/// round trips a second; more of them than that on a machine the proxy shares with its clients or the
/// database costs CPU per round trip (each sleeps and is woken apart, fewer events per `epoll_wait`): on
/// the 2-core development machine two relays used about 2 µs more user and up to 5 µs more kernel time
/// per transaction than one, and a third more context switches (README "Performance").
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |p| (p.get() / 2).max(1))
}

/// Single-threaded runtimes that sessions run on (see [`ServeOptions::workers`]).
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    /// One epoll relay beside each runtime: plain-TCP sessions of runtime `i` run on relay `i`.
    relays: Vec<epoll_relay::Handle>,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// A server dropped before it finished (its runtime shut down under it) still ends its worker threads; the
/// relays end when their last handle goes.
impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Workers {
    fn start(n: usize) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(2 * n);
        let mut relays = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let (relay, thread) = epoll_relay::Handle::start(format!("stepgate-relay-{i}"))?;
            relays.push(relay);
            threads.push(thread);
            let (tx, rx) = std::sync::mpsc::channel();
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("stepgate-worker-{i}"))
                    .spawn(move || {
                        match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(rt) => {
                                let _ = tx.send(Ok(rt.handle().clone()));
                                rt.block_on(stop.cancelled());
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e));
                            }
                        }
                    })?,
            );
            let handle = rx
                .recv()
                .map_err(|_| std::io::Error::other("a worker thread did not start"))??;
            handles.push(handle);
        }
        Ok(Workers {
            handles,
            relays,
            stop,
            threads,
        })
    }
}

/// A bound, not yet running, stepgate proxy.
pub struct Server {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    admin_listener: Option<TcpListener>,
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
        let policy = crate::token::Policy::load(&config)?;
        let audit = std::sync::Arc::new(
            crate::audit::AuditLog::open(&config.state_dir)?
                .with_sync_delay(options.audit_sync_delay.unwrap_or_default()),
        );
        if let Some(damage) = crate::audit::repair::damage(&config.state_dir)? {
            return Err(ServeError::AuditDamaged(
                damage,
                config.state_dir.display().to_string(),
            ));
        }
        let registry = crate::gate::Registry::new(Some(audit.clone()));
        let records = crate::audit::AuditLog::read_dir(&config.state_dir)?;
        registry.restore(&records);
        let ledger = Arc::new(crate::token::Ledger::default());
        ledger.restore(&records);
        let approved: Vec<String> = records
            .iter()
            .filter(|r| r["event"] == "approved")
            .filter_map(|r| r["token"].as_str().map(str::to_string))
            .collect();
        // Session numbers go on from the log's highest, so one number names one session of this state
        // directory across restarts (`token new --session`, the audit trail).
        let first_session = records
            .iter()
            .filter_map(|r| r["session_id"].as_u64())
            .max()
            .unwrap_or(0)
            + 1;
        drop(records);
        for id in crate::audit::AuditLog::damaged_token_ids(&config.state_dir)? {
            warn!(token_id = %id, "a damaged audit record names this token: all its uses count as spent");
            ledger.burn(&id);
        }
        if options.unsafe_no_gate {
            warn!("--unsafe-no-gate: NOTHING is classified or held; use this only to measure the gate's cost");
            audit.write(
                &crate::audit::AuditEvent::GateDisabled {
                    reason: "serve --unsafe-no-gate: the gate is off".into(),
                },
                true,
            )?;
        }
        let mut gate = gate::GateContext::new(config.clone(), registry, options.unsafe_no_gate)
            .with_tokens(policy, ledger, audit);
        if let Some(clock) = &options.clock {
            gate.clock = clock.clone();
        }
        gate.restore_approvals(&approved);
        gate.config_path = options
            .config_path
            .as_deref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
        let tls_acceptor = config.tls.as_ref().map(tls::acceptor).transpose()?;
        let upstream_tls = match config.upstream_tls {
            UpstreamTls::Disable => None,
            UpstreamTls::Prefer | UpstreamTls::Require => Some(tls::upstream_connector()?),
        };
        let metrics_listener = match &config.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr.as_str()).await.map_err(|source| {
                ServeError::Metrics {
                    addr: addr.clone(),
                    source,
                }
            })?),
            None => None,
        };
        let admin_listener =
            match config.admin.as_ref().and_then(|a| a.listen.as_ref()) {
                Some(addr) => Some(TcpListener::bind(addr.as_str()).await.map_err(|source| {
                    ServeError::Bind {
                        addr: addr.clone(),
                        source,
                    }
                })?),
                None => None,
            };
        let listener = TcpListener::bind(config.listen.as_str())
            .await
            .map_err(|source| ServeError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        Ok(Server {
            listener,
            metrics_listener,
            admin_listener,
            shared: Arc::new(Shared {
                config,
                tls_acceptor,
                upstream_tls,
                cancel_keys: DashMap::new(),
                force_close: CancellationToken::new(),
                next_session: AtomicU64::new(first_session),
                gate: std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(gate)),
                options,
                sessions: DashMap::new(),
                judges: judge::JudgePool::start(2).map_err(ServeError::Judges)?,
                reloaded: tokio::sync::watch::Sender::new(1),
            }),
        })
    }

    /// The held registry (for tests and the console).
    pub fn registry(&self) -> Arc<crate::gate::Registry> {
        self.shared.gate.load().registry.clone()
    }

    /// A handle to reload the policy while the server runs.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle::new(self.shared.clone())
    }

    /// Where `/metrics` is served, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Accepts connections until `shutdown` is cancelled, then drains sessions (see module docs).
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared;
        let metrics_task = self.metrics_listener.map(|l| {
            let gate = shared.gate.load();
            let audit = gate.audit.clone();
            info!(listen = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /metrics");
            tokio::spawn(crate::metrics::serve(l, gate.metrics.clone(), move || {
                match &audit {
                    Some(a) => (Some(a.head()), a.unavailable().is_some()),
                    None => (None, false),
                }
            }))
        });
        let wanted = match shared.options.workers {
            None => Some(default_workers()),
            Some(0) => None,
            Some(n) => Some(n),
        };
        let workers = match wanted {
            Some(n) => match Workers::start(n) {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!(error = %e, "cannot start worker runtimes; sessions run on the main runtime");
                    None
                }
            },
            None => None,
        };
        let permits = Arc::new(Semaphore::new(shared.config.max_connections));
        let tracker = TaskTracker::new();
        info!(
            listen = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            upstream = %shared.config.upstream,
            mode = shared.gate.load().mode.as_str(),
            // 0: sessions run on the runtime that called `run`.
            workers = workers.as_ref().map_or(0, |w| w.handles.len()),
            "stepgate is accepting connections"
        );
        let admin_listener = self.admin_listener;
        let mut next_worker = 0usize;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted.map(|a| (a, false)),
                accepted = async {
                    match &admin_listener {
                        Some(l) => l.accept().await,
                        None => std::future::pending().await,
                    }
                } => accepted.map(|a| (a, true)),
            };
            let ((tcp, peer), admin) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let permit = permits.clone().try_acquire_owned().ok();
            match &workers {
                Some(w) => {
                    // The socket moves to the worker's own reactor.
                    let Ok(std_tcp) = tcp.into_std() else {
                        continue;
                    };
                    let i = next_worker % w.handles.len();
                    let (handle, relay) = (&w.handles[i], w.relays[i].clone());
                    next_worker = next_worker.wrapping_add(1);
                    let shared = shared.clone();
                    tracker.spawn_on(
                        async move {
                            match tokio::net::TcpStream::from_std(std_tcp) {
                                Ok(tcp) => {
                                    accept::run(shared, tcp, peer, permit, admin, Some(relay)).await
                                }
                                Err(e) => warn!(error = %e, "cannot hand a connection to a worker"),
                            }
                        },
                        handle,
                    );
                }
                None => {
                    tracker.spawn(accept::run(shared.clone(), tcp, peer, permit, admin, None));
                }
            }
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
        if let Some(t) = metrics_task {
            t.abort();
        }
        if let Some(mut w) = workers {
            w.stop.cancel();
            for r in &w.relays {
                r.stop();
            }
            let threads = std::mem::take(&mut w.threads);
            let _ = tokio::task::spawn_blocking(move || {
                for t in threads {
                    let _ = t.join();
                }
            })
            .await;
        }
        info!("stepgate stopped");
    }
}
