//! A `[[rule]]`: which classes are guarded for which databases and users, and what a token for them needs.

use std::time::Duration;

use super::class::Class;
use super::signer::SignerPolicy;

/// Which statements are guarded for a database and user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub database: String,
    pub user: String,
    pub guard: Vec<Class>,
    /// Distinct signers a token needs.
    pub signatures: usize,
    /// Longest time from a signature to the token's not-after.
    pub max_token_lifetime: Duration,
    /// Tokens may list only statements with schema-qualified object names.
    pub require_qualified_names: bool,
    /// What a statement held without a token does: fail at once, or wait for an approval.
    pub on_hold: OnHold,
    /// How long a statement held under `on_hold = "wait"` waits for an approval before it is refused.
    pub wait_timeout: Duration,
}

/// What happens to a statement a rule holds (`on_hold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnHold {
    /// It fails at once with the held error (42501).
    #[default]
    Refuse,
    /// A statement outside an explicit transaction block waits (up to `wait_timeout`) for an approval that
    /// covers it (`stepgate approve`, the console's `APPROVE`): the client gets a NOTICE at once with the
    /// held id and the command to approve it; approved, the statement runs; not in time, it fails as with
    /// `refuse`. Inside a transaction block it fails at once: waiting there would keep the block's locks.
    Wait,
}

/// Default `wait_timeout` of a rule.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Default `max_token_lifetime` of a rule.
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

impl Default for Rule {
    fn default() -> Self {
        Rule {
            database: "*".into(),
            user: "*".into(),
            guard: Class::DEFAULT_GUARDED.to_vec(),
            signatures: 1,
            max_token_lifetime: DEFAULT_MAX_TOKEN_LIFETIME,
            require_qualified_names: false,
            on_hold: OnHold::Refuse,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
        }
    }
}

impl Rule {
    /// What the config check says of this rule, given the signers and whether the console is configured:
    /// the key and the message of the first problem.
    pub(super) fn check(
        &self,
        signers: &[SignerPolicy],
        console: bool,
    ) -> Result<(), (&'static str, String)> {
        let r = self;
        if r.wait_timeout < Duration::from_secs(1) || r.wait_timeout > Duration::from_secs(3600) {
            return Err((
                "rule.wait_timeout",
                format!(
                    "rule for database {:?}, user {:?}: must be between 1s and 1h",
                    r.database, r.user
                ),
            ));
        }
        if r.on_hold == OnHold::Wait && !console {
            return Err((
                "rule.on_hold",
                format!(
                    "rule for database {:?}, user {:?} waits for approvals (on_hold = \"wait\"), which come through the console: configure [admin]",
                    r.database, r.user
                ),
            ));
        }
        if r.signatures == 0 {
            return Err((
                "rule.signatures",
                format!(
                    "rule for database {:?}, user {:?}: must be at least 1",
                    r.database, r.user
                ),
            ));
        }
        // With signers configured, every rule's demand must be one the signers can meet.
        // (A rule that guards nothing never asks for a token.)
        if (!signers.is_empty() || r.signatures > 1) && !r.guard.is_empty() {
            let able = signers
                .iter()
                .filter(|s| {
                    s.databases.iter().any(|d| patterns_overlap(d, &r.database))
                        && s.classes.iter().any(|c| r.guard.contains(c))
                })
                .count();
            if able < r.signatures {
                return Err((
                    "rule.signatures",
                    format!(
                        "rule for database {:?}, user {:?} needs {} signers but only {able} [[signer]]s may sign for it",
                        r.database, r.user, r.signatures
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn matches(&self, database: &str, user: &str) -> bool {
        pattern_matches(&self.database, database) && pattern_matches(&self.user, user)
    }
}

/// `*` matches everything, `prefix*` a prefix, anything else itself.
pub fn pattern_matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

/// Whether some name matches both patterns.
pub(super) fn patterns_overlap(a: &str, b: &str) -> bool {
    match (a.strip_suffix('*'), b.strip_suffix('*')) {
        (Some(pa), Some(pb)) => pa.starts_with(pb) || pb.starts_with(pa),
        (Some(_), None) => pattern_matches(a, b),
        (None, Some(_)) => pattern_matches(b, a),
        (None, None) => a == b,
    }
}
