//! A reload: the config file and the keyring are read again, a new [`GateContext`] is built (keeping the held
//! registry, the ledger of spent uses, the metrics and the audit log) and swapped in; open sessions pick it up
//! at their next message. Settings that need a restart are named in a warning.

use std::sync::Arc;

use tracing::{info, warn};

use super::gate::context::GateContext;
use super::shared::Shared;
use crate::config::Config;

/// Controls a running server: reload its policy.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl ServerHandle {
    pub(super) fn new(shared: Arc<Shared>) -> ServerHandle {
        ServerHandle { shared }
    }
}

impl ServerHandle {
    /// Re-reads the config file and the keyring and swaps the policy in; open sessions continue under the new
    /// one (their rule is chosen again, a token is re-verified before its next use). A broken file or
    /// keyring is rejected with its error and the old policy stays. Either way the attempt is audited.
    pub fn reload(&self) -> Result<u64, String> {
        let shared = &self.shared;
        let old = shared.gate.load_full();
        let attempt = (|| {
            let config = Config::load(
                shared.options.config_path.as_deref(),
                &shared.options.overrides,
            )
            .map_err(|e| e.to_string())?;
            let policy = crate::token::Policy::load(&config)?;
            let restart = shared.config.restart_only_changes(&config);
            if !restart.is_empty() {
                warn!(keys = ?restart, "reload: these settings take effect only after a restart");
            }
            let mut ctx = GateContext::with_registry(config, old.registry.clone(), old.disabled);
            ctx.generation = old.generation + 1;
            ctx.policy = policy;
            ctx.ledger = old.ledger.clone();
            ctx.metrics = old.metrics.clone();
            ctx.audit = old.audit.clone();
            Ok::<_, String>(ctx)
        })();
        let source = shared
            .options
            .config_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(flags only)".into());
        let mut f = serde_json::Map::new();
        f.insert("config".into(), source.clone().into());
        old.metrics
            .reloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = match attempt {
            Ok(ctx) => {
                let generation = ctx.generation;
                f.insert("outcome".into(), "applied".into());
                f.insert("generation".into(), generation.into());
                f.insert("signers".into(), ctx.policy.signers.len().into());
                shared.gate.store(Arc::new(ctx));
                shared.reloaded.send_replace(generation);
                info!(config = %source, generation, "policy reloaded");
                Ok(generation)
            }
            Err(e) => {
                f.insert("outcome".into(), "rejected".into());
                f.insert("error".into(), e.clone().into());
                warn!(config = %source, error = %e, "reload rejected; the old policy stays");
                Err(e)
            }
        };
        if let Some(audit) = &old.audit {
            if let Err(e) = audit.append("policy_reloaded", f, true) {
                warn!(error = %e, "audit log write failed");
            }
        }
        result
    }
}
