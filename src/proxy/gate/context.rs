//! What every session of a server shares: the config, the classification cache, the held registry, the token
//! policy, the ledger of spent uses, the audit log and the metrics. Rebuilt by a reload (keeping the registry,
//! the ledger and the metrics) and swapped in atomically; a session picks the new one at its next message.

use std::sync::Arc;

use crate::audit::AuditLog;
use crate::classify::cache::CachedClassifier;
use crate::config::Config;
use crate::gate::{Clock, Mode, Registry, SystemClock};
use crate::token::approvals::Approvals;
use crate::token::{Ledger, Policy};

/// Shared by every session of a server.
pub struct GateContext {
    pub config: Config,
    pub cache: CachedClassifier,
    pub registry: Arc<Registry>,
    pub mode: Mode,
    /// `serve --unsafe-no-gate`: nothing is classified or held (for measuring the gate's cost).
    pub disabled: bool,
    /// Policy generation, part of every cache key.
    pub generation: u64,
    /// Keyring and signers tokens are verified against.
    pub policy: Policy,
    /// Spent token uses, shared by every session (and kept across reloads).
    pub ledger: Arc<Ledger>,
    /// Tokens deposited with `stepgate approve` / `APPROVE`, for any matching session (kept across reloads).
    pub approvals: Arc<Approvals>,
    /// The config file the server was started with (absolute), for the HINT of a held statement.
    pub config_path: Option<std::path::PathBuf>,
    /// The config's `[[allow]]` entries by fingerprint.
    pub allow: std::collections::HashMap<String, Vec<crate::config::allow::Allow>>,
    /// Where token events are recorded (None only in unit tests).
    pub audit: Option<Arc<AuditLog>>,
    /// Counters for `/metrics`, kept across reloads.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The time tokens are judged at (kept across reloads).
    pub clock: Arc<dyn Clock>,
}

impl GateContext {
    pub fn new(config: Config, registry: Registry, disabled: bool) -> GateContext {
        Self::with_registry(config, Arc::new(registry), disabled)
    }

    /// A context sharing an existing registry (a reload keeps what was held).
    pub fn with_registry(config: Config, registry: Arc<Registry>, disabled: bool) -> GateContext {
        let classifier = crate::classify::Classifier::for_config(&config);
        let allow = allow_by_fingerprint(&config);
        GateContext {
            config_path: None,
            allow,
            mode: config.mode,
            config,
            cache: CachedClassifier::new(classifier, 50_000),
            registry,
            disabled,
            generation: 1,
            policy: Policy::default(),
            ledger: Arc::new(Ledger::default()),
            approvals: Arc::default(),
            audit: None,
            metrics: Arc::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// The context after a reload: the new config and token policy, with what outlives a reload kept from
    /// `old` (the held registry, the ledger of spent uses, the metrics, the audit log) and the next generation.
    pub fn reload(old: &GateContext, config: Config, policy: Policy) -> GateContext {
        let mut ctx = GateContext::with_registry(config, old.registry.clone(), old.disabled);
        ctx.generation = old.generation + 1;
        ctx.policy = policy;
        ctx.ledger = old.ledger.clone();
        ctx.approvals = old.approvals.clone();
        ctx.config_path = old.config_path.clone();
        ctx.metrics = old.metrics.clone();
        ctx.audit = old.audit.clone();
        ctx.clock = old.clock.clone();
        ctx
    }

    /// Adds the token policy, the ledger of spent uses and the audit log.
    pub fn with_tokens(
        mut self,
        policy: Policy,
        ledger: Arc<Ledger>,
        audit: Arc<AuditLog>,
    ) -> Self {
        self.policy = policy;
        self.ledger = ledger;
        self.audit = Some(audit);
        self
    }
}

/// The `[[allow]]` entries keyed by fingerprint. An entry whose `sql` is not exactly one statement is left
/// out, with an error in the log: what it meant to allow stays guarded.
fn allow_by_fingerprint(
    config: &Config,
) -> std::collections::HashMap<String, Vec<crate::config::allow::Allow>> {
    let mut out: std::collections::HashMap<String, Vec<_>> = Default::default();
    for a in &config.allow {
        let fingerprint = match (&a.fingerprint, &a.sql) {
            (Some(f), _) => Some(f.clone()),
            (None, Some(sql)) => crate::token::payload::fingerprint_of(sql),
            (None, None) => None,
        };
        match fingerprint {
            Some(f) => out.entry(f).or_default().push(a.clone()),
            None => {
                tracing::error!(allow = %a.name, source = %a.source, "an [[allow]] entry's sql is not exactly one statement; it allows nothing")
            }
        }
    }
    out
}

impl GateContext {
    /// The `[[allow]]` entry that lets this statement pass for a session of `database` and `user`.
    pub fn allow_for(
        &self,
        fingerprint: &str,
        database: &str,
        user: &str,
    ) -> Option<&crate::config::allow::Allow> {
        self.allow
            .get(fingerprint)?
            .iter()
            .find(|a| a.applies_to(database, user))
    }

    /// Records a statement an `[[allow]]` entry let pass (`allowed`, not fsync'd: no token use hangs on it).
    pub fn record_allowed(
        &self,
        session: &crate::audit::SessionFields,
        entry: &crate::config::allow::Allow,
        fingerprint: &str,
        sql: &str,
        class: crate::classify::Class,
    ) {
        tracing::info!(allow = %entry.name, %fingerprint, %class, "allowed without a token");
        if let Some(log) = &self.audit {
            let event = crate::audit::AuditEvent::Allowed {
                session: session.clone(),
                sql: crate::gate::redact(&crate::gate::clip(sql, self.config.max_held_sql)),
                fingerprint: fingerprint.to_string(),
                class,
            };
            if let Err(e) = log.write(&event, false) {
                tracing::error!(error = %e, "audit log write failed");
            }
        }
    }
}
