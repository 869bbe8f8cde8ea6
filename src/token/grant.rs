//! Tokens at run time: the loaded policy (keyring and signers), a session's verified token, and the ledger of
//! spent uses shared by every session.
//!
//! A use is *reserved* in the [`Ledger`] before a statement is forwarded (the caller writes the durable
//! `authorized` audit record), and either stays spent (the statement ran, or stepgate crashed) or is
//! *released* when the server reports an error. At start-up the ledger is rebuilt from the audit log:
//! every `authorized` record spends a use, every `released` record gives one back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use serde_json::Value;

use super::signed::Keyring;
use super::verify::{verify_token, Authorization, Reason, SignerPolicy, TokenPolicy};
use crate::classify::Classifier;
use crate::config::{Config, Rule};

/// Why the token policy of a configuration cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("keyring: {0}")]
    Keyring(#[from] super::signed::KeyringError),
    #[error("signer {signer:?}: key {fingerprint} is not in the keyring {keyring}")]
    MissingKey {
        signer: String,
        fingerprint: String,
        keyring: String,
    },
}

/// The keyring and the signers of a configuration, loaded and cross-checked.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub keyring: Keyring,
    pub signers: Vec<SignerPolicy>,
    pub instance: Option<String>,
}

impl Policy {
    /// Loads the config's keyring and checks that every `[[signer]]` has its key in it.
    pub fn load(config: &Config) -> Result<Policy, PolicyError> {
        let keyring = match &config.keyring {
            Some(path) => Keyring::load(path)?,
            None => Keyring::default(),
        };
        for s in &config.signers {
            let found = keyring.certs.iter().any(|c| {
                c.fingerprint()
                    .to_hex()
                    .eq_ignore_ascii_case(&s.fingerprint)
            });
            if !found {
                return Err(PolicyError::MissingKey {
                    signer: s.name.clone(),
                    fingerprint: s.fingerprint.clone(),
                    keyring: config
                        .keyring
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                });
            }
        }
        Ok(Policy {
            keyring,
            signers: config.signers.clone(),
            instance: config.instance.clone(),
        })
    }

    /// Verifies `token` for a session under `rule`.
    pub fn verify(
        &self,
        token: &[u8],
        rule: &Rule,
        classifier: &Classifier,
        database: &str,
        user: &str,
        now: SystemTime,
    ) -> Result<Authorization, Reason> {
        let policy = TokenPolicy {
            keyring: &self.keyring,
            signers: &self.signers,
            instance: self.instance.as_deref(),
            signatures_required: rule.signatures,
            max_token_lifetime: rule.max_token_lifetime,
            classifier,
        };
        let auth = verify_token(token, &policy, database, user, now)?;
        if rule.require_qualified_names {
            for (i, st) in auth.payload.statements.iter().enumerate() {
                let names = crate::classify::unqualified_names(&st.sql);
                if !names.is_empty() {
                    return Err(Reason::Malformed(format!(
                        "statement {} names {} without a schema; the rule for this database requires schema-qualified names (require_qualified_names)",
                        i + 1,
                        names.join(", ")
                    )));
                }
            }
        }
        Ok(auth)
    }
}

/// A session's verified token.
#[derive(Debug)]
pub struct ActiveToken {
    pub auth: Authorization,
    /// The token as supplied (kept to re-verify after a reload or when a validity limit passes).
    pub raw: Vec<u8>,
    /// Policy generation the verification was made under.
    pub generation: u64,
    /// How many times each fingerprint is listed.
    pub listed: HashMap<String, u32>,
}

impl PartialEq for ActiveToken {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw && self.generation == other.generation
    }
}

impl Eq for ActiveToken {}

impl ActiveToken {
    pub fn new(auth: Authorization, raw: Vec<u8>, generation: u64) -> ActiveToken {
        let mut listed = HashMap::new();
        for g in &auth.payload.statements {
            *listed.entry(g.fingerprint.clone()).or_insert(0) += 1;
        }
        ActiveToken {
            auth,
            raw,
            generation,
            listed,
        }
    }

    pub fn id(&self) -> &str {
        &self.auth.payload.id
    }

    /// Whether the cached verification still stands at `now` under policy `generation`.
    pub fn is_current(&self, generation: u64, now: SystemTime) -> bool {
        self.generation == generation && now <= self.auth.valid_until
    }

    /// The signers as audit fields: `[{fingerprint, user_id, name}]`.
    /// The signers as the audit log keeps them.
    pub fn signers(&self) -> Vec<crate::audit::event::Signer> {
        self.auth
            .signers
            .iter()
            .map(|(s, name)| crate::audit::event::Signer {
                fingerprint: s.fingerprint.clone(),
                user_id: s.user_id.clone(),
                name: name.clone(),
            })
            .collect()
    }

    pub fn signers_json(&self) -> Value {
        Value::Array(
            self.auth
                .signers
                .iter()
                .map(|(s, name)| {
                    serde_json::json!({"fingerprint": s.fingerprint, "user_id": s.user_id, "name": name})
                })
                .collect(),
        )
    }
}

/// Spent uses per (token id, statement fingerprint), shared by every session of a server. Lookups borrow
/// the caller's strings; only the first use of a fingerprint allocates.
#[derive(Debug, Default)]
pub struct Ledger {
    spent: DashMap<String, HashMap<String, u32>>,
    /// Tokens named in damaged audit bytes: every use counts as spent.
    burned: DashMap<String, ()>,
}

impl Ledger {
    /// Counts every use of `token_id` as spent (its records could not all be read back).
    pub fn burn(&self, token_id: &str) {
        self.burned.insert(token_id.to_string(), ());
    }

    /// Spends one use if fewer than `limit` are spent; false when none is left.
    pub fn reserve(&self, token_id: &str, fingerprint: &str, limit: u32) -> bool {
        if !self.burned.is_empty() && self.burned.contains_key(token_id) {
            return false;
        }
        if let Some(mut uses) = self.spent.get_mut(token_id) {
            return match uses.get_mut(fingerprint) {
                Some(n) if *n >= limit => false,
                Some(n) => {
                    *n += 1;
                    true
                }
                None if limit == 0 => false,
                None => {
                    uses.insert(fingerprint.to_string(), 1);
                    true
                }
            };
        }
        if limit == 0 {
            return false;
        }
        let mut uses = self.spent.entry(token_id.to_string()).or_default();
        let n = uses.entry(fingerprint.to_string()).or_insert(0);
        if *n >= limit {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives one use back.
    pub fn release(&self, token_id: &str, fingerprint: &str) {
        if let Some(mut uses) = self.spent.get_mut(token_id) {
            if let Some(n) = uses.get_mut(fingerprint) {
                *n = n.saturating_sub(1);
            }
        }
    }

    pub fn spent(&self, token_id: &str, fingerprint: &str) -> u32 {
        self.spent
            .get(token_id)
            .and_then(|uses| uses.get(fingerprint).copied())
            .unwrap_or(0)
    }

    /// Rebuilds the ledger from audit records: `authorized` spends, `released` gives back.
    pub fn restore(&self, records: &[Value]) {
        for r in records {
            let (Some(id), Some(fp)) = (r["token_id"].as_str(), r["fingerprint"].as_str()) else {
                continue;
            };
            match r["event"].as_str() {
                Some("authorized") => {
                    *self
                        .spent
                        .entry(id.to_string())
                        .or_default()
                        .entry(fp.to_string())
                        .or_insert(0) += 1;
                }
                Some("released") => self.release(id, fp),
                _ => {}
            }
        }
    }
}

/// Shared handle to a session's token.
pub type TokenRef = Arc<ActiveToken>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ledger_spends_releases_and_restores() {
        let l = Ledger::default();
        assert!(l.reserve("t", "f", 2));
        assert!(l.reserve("t", "f", 2));
        assert!(!l.reserve("t", "f", 2));
        l.release("t", "f");
        assert!(l.reserve("t", "f", 2));
        let r = Ledger::default();
        r.restore(&[
            json!({"event": "authorized", "token_id": "t", "fingerprint": "f"}),
            json!({"event": "authorized", "token_id": "t", "fingerprint": "f"}),
            json!({"event": "released", "token_id": "t", "fingerprint": "f"}),
            json!({"event": "held", "token_id": "t", "fingerprint": "f"}),
        ]);
        assert_eq!(r.spent("t", "f"), 1);
        assert!(r.reserve("t", "f", 2));
        assert!(!r.reserve("t", "f", 2));
    }
}
