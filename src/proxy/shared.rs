//! What every session task of one server shares: the listener's settings, TLS, the cancel keys handed out,
//! the policy in force (swapped by a reload), the open sessions and the judge threads.

use std::sync::atomic::AtomicU64;

use dashmap::DashMap;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use super::gate::context::GateContext;
use super::judge;
use crate::config::Config;

/// State shared by every session of one server.
pub struct Shared {
    /// The settings read once at start (listen address, upstream, TLS, limits): what the listener runs with.
    /// The policy (rules, signers, admin users, mode…) is `gate.config`, which a reload replaces; the two
    /// differ only in the restart-only keys a reload warns about ([`Config::restart_only_changes`]).
    pub config: Config,
    pub tls_acceptor: Option<TlsAcceptor>,
    pub upstream_tls: Option<TlsConnector>,
    /// BackendKeyData of open sessions: a CancelRequest is relayed only for a key stepgate handed out.
    /// Each key's value is its session's [`super::flow::Flags::cancel_wait`]: a cancel also ends a wait for
    /// an approval, which the server knows nothing of.
    pub cancel_keys: DashMap<(i32, i32), std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Cancelled when open sessions must end (after `shutdown_timeout`).
    pub force_close: CancellationToken,
    pub next_session: AtomicU64,
    /// The policy in force; a reload swaps it while sessions run.
    /// (Shared with the threads where statements wait for an approval: each round reads the policy in force.)
    pub gate: std::sync::Arc<arc_swap::ArcSwap<GateContext>>,
    pub options: ServeOptions,
    /// Open client sessions, for the console's SHOW SESSIONS.
    pub sessions: DashMap<u64, SessionSummary>,
    /// Where large, uncached query strings are judged (off the relay threads).
    pub judges: judge::JudgePool,
    /// The policy generation, sent after every applied reload (console sessions re-check their admin).
    pub reloaded: tokio::sync::watch::Sender<u64>,
}

/// What the console shows of an open session.
#[derive(Debug, Clone)]
pub struct SessionSummary {
    pub user: String,
    pub database: String,
    pub client_addr: String,
    pub application_name: String,
    pub tls: bool,
    pub connected: String,
}

/// Options of `serve` that are deliberately not in the config file.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Classify and hold nothing (`--unsafe-no-gate`, for measuring the gate's own cost).
    pub unsafe_no_gate: bool,
    /// The config file a reload re-reads (None: defaults and flags only; the keyring is still re-read).
    pub config_path: Option<std::path::PathBuf>,
    /// Command-line flags, applied again on every reload.
    pub overrides: crate::config::Overrides,
    /// Run sessions on this many workers, connections handed out in turn. A worker is a single-threaded
    /// runtime plus an epoll relay thread: the runtime negotiates startup and login and runs TLS sessions,
    /// the relay carries plain-TCP sessions. None (the default): [`default_workers`]. `Some(0)`: every session as an
    /// async task on the runtime that calls [`Server::run`] (a multi-threaded one under `stepgate serve`),
    /// which measured slower: per round trip the runtime's wake-ups cost more CPU than the relaying itself
    /// (README "Performance").
    pub workers: Option<usize>,
    /// The clock tokens are judged at (None: the wall clock). Tests move a [`crate::gate::ManualClock`].
    pub clock: Option<std::sync::Arc<dyn crate::gate::Clock>>,
    /// Makes every fsync of the audit log take this much longer: a slow disk, simulated (tests).
    pub audit_sync_delay: Option<std::time::Duration>,
}
