//! A `[[signer]]` of the configuration: a key allowed to sign tokens, and for which databases and classes.

use super::class::Class;

/// A key allowed to sign, and for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerPolicy {
    pub name: String,
    /// Primary key fingerprint, uppercase hex without spaces.
    pub fingerprint: String,
    /// Database names or patterns (`*`, `prefix*`).
    pub databases: Vec<String>,
    pub classes: Vec<Class>,
}
