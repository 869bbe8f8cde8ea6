//! A reload: the config file and the keyring are read again, a new [`GateContext`] is built (keeping the held
//! registry, the ledger of spent uses, the metrics and the audit log) and swapped in; open sessions pick it up
//! at their next message. Settings that need a restart are named in a warning.

use std::sync::Arc;

use tracing::{info, warn};

use super::gate::context::GateContext;
use super::shared::Shared;
use crate::audit::AuditEvent;
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

/// Why a reload was rejected (the old policy stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Policy(#[from] crate::token::grant::PolicyError),
}

impl ServerHandle {
    /// Re-reads the config file and the keyring and swaps the policy in; open sessions continue under the new
    /// one (their rule is chosen again, a token is re-verified before its next use; a console session whose
    /// user is no longer an admin is closed). A broken file or keyring is rejected with its error and the old
    /// policy stays. Either way the attempt is audited.
    pub fn reload(&self) -> Result<u64, ReloadError> {
        let shared = &self.shared;
        let old = shared.gate.load_full();
        let mut restart_needed = Vec::new();
        let attempt = (|| {
            let config = Config::load(
                shared.options.config_path.as_deref(),
                &shared.options.overrides,
            )?;
            let policy = crate::token::Policy::load(&config)?;
            restart_needed = shared.config.restart_only_changes(&config);
            if !restart_needed.is_empty() {
                warn!(keys = ?restart_needed, "reload: these settings take effect only after a restart");
            }
            Ok::<_, ReloadError>(GateContext::reload(&old, config, policy))
        })();
        let source = shared
            .options
            .config_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(flags only)".into());
        old.metrics
            .reloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (event, result) = match attempt {
            Ok(ctx) => {
                let generation = ctx.generation;
                let signers = ctx.policy.signers.len();
                shared.gate.store(Arc::new(ctx));
                shared.reloaded.send_replace(generation);
                info!(config = %source, generation, "policy reloaded");
                (
                    AuditEvent::PolicyReloaded {
                        config: source,
                        outcome: "applied".into(),
                        generation: Some(generation),
                        signers: Some(signers),
                        restart_needed: restart_needed.iter().map(|k| k.to_string()).collect(),
                        error: None,
                    },
                    Ok(generation),
                )
            }
            Err(e) => {
                warn!(config = %source, error = %e, "reload rejected; the old policy stays");
                (
                    AuditEvent::PolicyReloaded {
                        config: source,
                        outcome: "rejected".into(),
                        generation: None,
                        signers: None,
                        restart_needed: Vec::new(),
                        error: Some(e.to_string()),
                    },
                    Err(e),
                )
            }
        };
        if let Some(audit) = &old.audit {
            if let Err(e) = audit.write(&event, true) {
                warn!(error = %e, "audit log write failed");
            }
        }
        result
    }
}
