//! Every audit event, typed (DESIGN.md "Audit log"), and the reason codes a token or an authorization is
//! refused with. A record is written only from an [`AuditEvent`]: its variant is the `event` field, its
//! fields are the record's fields (session fields flat), and `seq`, `time` and `prev` are added by the log.

use serde::{Deserialize, Serialize};

use crate::config::Class;

/// Who sent a statement: the session fields every statement and token record carries, flat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionFields {
    pub user: String,
    pub database: String,
    pub client_addr: String,
    pub application_name: String,
    pub session_id: u64,
}

/// Why a token, or the use of one, is refused (DESIGN.md "Tokens"): in the refusal's DETAIL, the
/// `token_rejected` record, and the `stepgate_tokens_rejected_total` metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    BadSignature,
    UnknownKey,
    KeyExpired,
    KeyRevoked,
    SignatureTooOld,
    SignerNotAllowed,
    NotEnoughSigners,
    TokenExpired,
    TokenNotYetValid,
    WrongInstance,
    WrongDatabase,
    WrongUser,
    StatementNotListed,
    AlreadyUsed,
    Malformed,
}

impl ReasonCode {
    pub const ALL: [ReasonCode; 15] = [
        ReasonCode::BadSignature,
        ReasonCode::UnknownKey,
        ReasonCode::KeyExpired,
        ReasonCode::KeyRevoked,
        ReasonCode::SignatureTooOld,
        ReasonCode::SignerNotAllowed,
        ReasonCode::NotEnoughSigners,
        ReasonCode::TokenExpired,
        ReasonCode::TokenNotYetValid,
        ReasonCode::WrongInstance,
        ReasonCode::WrongDatabase,
        ReasonCode::WrongUser,
        ReasonCode::StatementNotListed,
        ReasonCode::AlreadyUsed,
        ReasonCode::Malformed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::BadSignature => "bad_signature",
            ReasonCode::UnknownKey => "unknown_key",
            ReasonCode::KeyExpired => "key_expired",
            ReasonCode::KeyRevoked => "key_revoked",
            ReasonCode::SignatureTooOld => "signature_too_old",
            ReasonCode::SignerNotAllowed => "signer_not_allowed",
            ReasonCode::NotEnoughSigners => "not_enough_signers",
            ReasonCode::TokenExpired => "token_expired",
            ReasonCode::TokenNotYetValid => "token_not_yet_valid",
            ReasonCode::WrongInstance => "wrong_instance",
            ReasonCode::WrongDatabase => "wrong_database",
            ReasonCode::WrongUser => "wrong_user",
            ReasonCode::StatementNotListed => "statement_not_listed",
            ReasonCode::AlreadyUsed => "already_used",
            ReasonCode::Malformed => "malformed",
        }
    }

    /// Position in [`ReasonCode::ALL`] (for counters indexed by code).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl PartialEq<&str> for ReasonCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key that signed a token, as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signer {
    pub fingerprint: String,
    pub user_id: String,
    /// The `[[signer]]` name.
    pub name: String,
}

/// A held (or, in observe mode, observed) message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    #[serde(flatten)]
    pub session: SessionFields,
    pub held_id: String,
    /// The message's SQL, password literals redacted.
    pub sql: String,
    /// The first statement's fingerprint, then all of them with their SQL.
    pub fingerprint: String,
    pub fingerprints: Vec<String>,
    pub statements: Vec<String>,
    pub class: Class,
    pub reason: String,
}

/// One reserved use of a token for one statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Use {
    #[serde(flatten)]
    pub session: SessionFields,
    pub sql: String,
    pub fingerprint: String,
    pub class: Class,
    pub token_id: String,
    pub signers: Vec<Signer>,
}

/// Every record of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A guarded message was refused and is waiting for a token.
    Held(Held),
    /// Observe mode: a guarded message ran and would have been held.
    Observed(Held),
    /// A statement refused outright, without a held entry (it names a stepgate setting).
    Refused {
        #[serde(flatten)]
        session: SessionFields,
        sql: String,
        reason: String,
    },
    /// A session presented a verified token; the record keeps the token itself (it is the evidence). Written
    /// before the SET (or the login) that carries it goes on, so it precedes every use; the fsync of the
    /// first use's `authorized` record makes it durable too (one append-only file).
    TokenSet {
        #[serde(flatten)]
        session: SessionFields,
        token_id: String,
        signers: Vec<Signer>,
        not_after: String,
        token: String,
    },
    /// A token failed verification; only its hash is kept.
    TokenRejected {
        #[serde(flatten)]
        session: SessionFields,
        reason: ReasonCode,
        detail: String,
        token_sha256: String,
    },
    /// A use was reserved, fsync'd before the statement is forwarded.
    Authorized(Use),
    /// The server completed the statement (`outcome` is its command tag).
    Executed {
        #[serde(flatten)]
        used: Use,
        outcome: String,
    },
    /// The server did not run the statement: the use is given back.
    Released {
        #[serde(flatten)]
        used: Use,
        reason: String,
    },
    /// The transaction the authorized statement ran in committed…
    Committed(Use),
    /// … or rolled back.
    RolledBack(Use),
    /// A reload was applied or rejected.
    PolicyReloaded {
        config: String,
        outcome: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signers: Option<usize>,
        /// Changed settings that take effect only after a restart.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        restart_needed: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A console login or command.
    AdminAction {
        user: String,
        client_addr: String,
        command: String,
        outcome: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held_id: Option<String>,
    },
    /// A torn last line was cut at start-up.
    Recovered { bytes: u64, reason: String },
    /// `serve --unsafe-no-gate`: nothing is classified or held until the next start.
    GateDisabled { reason: String },
    /// A signed token handed to the running stepgate (`stepgate approve`, console `APPROVE`); `user` is the
    /// admin. It then covers any session it names.
    Approved {
        user: String,
        token_id: String,
        signers: Vec<Signer>,
        token: String,
    },
    /// An `[[allow]]` entry passed a statement without a token.
    Allowed {
        #[serde(flatten)]
        session: SessionFields,
        sql: String,
        fingerprint: String,
        class: Class,
    },
    /// `stepgate audit repair` moved damaged bytes aside (`file`) and continued the chain.
    Repaired {
        file: String,
        bytes: u64,
        reason: String,
    },
}

impl AuditEvent {
    /// Every event name, as written in the `event` field.
    pub const NAMES: [&'static str; 17] = [
        "held",
        "observed",
        "refused",
        "token_set",
        "token_rejected",
        "authorized",
        "executed",
        "released",
        "committed",
        "rolled_back",
        "policy_reloaded",
        "admin_action",
        "recovered",
        "gate_disabled",
        "approved",
        "allowed",
        "repaired",
    ];

    /// The `event` field of this record.
    pub fn name(&self) -> &'static str {
        match self {
            AuditEvent::Held(_) => "held",
            AuditEvent::Observed(_) => "observed",
            AuditEvent::Refused { .. } => "refused",
            AuditEvent::TokenSet { .. } => "token_set",
            AuditEvent::TokenRejected { .. } => "token_rejected",
            AuditEvent::Authorized(_) => "authorized",
            AuditEvent::Executed { .. } => "executed",
            AuditEvent::Released { .. } => "released",
            AuditEvent::Committed(_) => "committed",
            AuditEvent::RolledBack(_) => "rolled_back",
            AuditEvent::PolicyReloaded { .. } => "policy_reloaded",
            AuditEvent::AdminAction { .. } => "admin_action",
            AuditEvent::Recovered { .. } => "recovered",
            AuditEvent::GateDisabled { .. } => "gate_disabled",
            AuditEvent::Approved { .. } => "approved",
            AuditEvent::Allowed { .. } => "allowed",
            AuditEvent::Repaired { .. } => "repaired",
        }
    }
}
