//! The signers of a configuration beside their keys in the keyring, and each key's state now: what
//! `stepgate keys` prints and the console's SHOW SIGNERS shows.

use std::time::SystemTime;

use sequoia_openpgp::policy::StandardPolicy;
use sequoia_openpgp::types::RevocationStatus;
use sequoia_openpgp::Cert;

use super::signed::Keyring;
use crate::config::Config;

fn key_state(cert: &Cert, now: SystemTime) -> (String, String) {
    let policy = StandardPolicy::new();
    match cert.with_policy(&policy, now) {
        Ok(vc) => {
            let expires = vc
                .primary_key()
                .key_expiration_time()
                .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                .unwrap_or_else(|| "never".into());
            let state = if let RevocationStatus::Revoked(_) = vc.revocation_status() {
                "REVOKED"
            } else if vc.alive().is_err() {
                "EXPIRED"
            } else {
                "valid"
            };
            (expires, state.into())
        }
        Err(e) => {
            let text = e.to_string();
            let state = if text.contains("revoked") {
                "REVOKED"
            } else {
                "EXPIRED"
            };
            ("-".into(), format!("{state} ({text})"))
        }
    }
}

fn user_id(cert: &Cert) -> String {
    cert.userids()
        .next()
        .map(|u| String::from_utf8_lossy(u.userid().value()).into_owned())
        .unwrap_or_default()
}

/// One signer (or an unnamed key of the keyring) and its key's state now.
#[derive(Debug, Clone)]
pub struct SignerRow {
    /// `(none)` for a key no `[[signer]]` names.
    pub name: String,
    pub fingerprint: String,
    /// `valid`, `EXPIRED`, `REVOKED` or `MISSING` (not in the keyring).
    pub state: String,
    pub expires: String,
    pub databases: String,
    pub classes: String,
    pub user_id: String,
}

/// The signers of `config` with their keys in `keyring`, then keys no signer names.
pub fn signer_rows(config: &Config, keyring: &Keyring) -> Vec<SignerRow> {
    let now = SystemTime::now();
    let mut rows = Vec::new();
    for s in &config.signers {
        let cert = keyring.certs.iter().find(|c| {
            c.fingerprint()
                .to_hex()
                .eq_ignore_ascii_case(&s.fingerprint)
        });
        let (expires, state, uid) = match cert {
            Some(c) => {
                let (e, st) = key_state(c, now);
                (e, st, user_id(c))
            }
            None => ("-".into(), "MISSING".into(), "(not in the keyring)".into()),
        };
        rows.push(SignerRow {
            name: s.name.clone(),
            fingerprint: s.fingerprint.clone(),
            state,
            expires,
            databases: s.databases.join(","),
            classes: s
                .classes
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(","),
            user_id: uid,
        });
    }
    for c in &keyring.certs {
        let fp = c.fingerprint().to_hex();
        if !config
            .signers
            .iter()
            .any(|s| s.fingerprint.eq_ignore_ascii_case(&fp))
        {
            let (expires, state) = key_state(c, now);
            rows.push(SignerRow {
                name: "(none)".into(),
                fingerprint: fp,
                state,
                expires,
                databases: "-".into(),
                classes: "-".into(),
                user_id: user_id(c),
            });
        }
    }
    rows
}
