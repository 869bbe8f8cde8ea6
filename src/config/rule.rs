//! A `[[rule]]`: which classes are guarded for which databases and users, and what a token for them needs.

use std::time::Duration;

use super::class::Class;

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
}

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
        }
    }
}

impl Rule {
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
