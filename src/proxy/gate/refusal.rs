//! The fixed parts of a refusal: what the server receives in place of a refused message, the error texts that
//! do not depend on the session, and why a message is refused before any decision.

use super::expect::StmtInfo;
use crate::gate::Decision;
use crate::metrics::Outcome;
use crate::proxy::authz::Reservation;
use crate::wire::reply::ErrorReply;

/// What the server receives in place of a refused statement: it fails in PostgreSQL's parser (a syntax
/// error at "stepgate") whatever the session's state, so it runs nothing and can be planted by nobody.
pub const REFUSAL_SQL: &[u8] = b"stepgate refused this statement";
/// The statement name of the Parse sent in place of a refused Execute; never stored (the parse fails first).
pub(super) const REFUSAL_STATEMENT: &[u8] = b"stepgate_refusal";

/// The metrics outcome of a decision.
pub(super) fn outcome(decision: Decision, reservations: &[Reservation]) -> Outcome {
    match decision {
        Decision::Refuse => Outcome::Held,
        Decision::Observe => Outcome::Observed,
        Decision::Pass if reservations.is_empty() => Outcome::Pass,
        Decision::Pass => Outcome::Authorized,
    }
}

/// Why a message is refused outright, before any decision.
pub(super) enum Refused {
    /// It names a stepgate setting in a way that is not accepted.
    Mention,
    /// It cannot be judged: held as this.
    Hold(Box<StmtInfo>),
    /// `SET stepgate.token` with a token that does not verify.
    Token(ErrorReply),
}

/// Text safe to put inside a single-quoted literal we build ourselves.
pub(super) fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " =;:,*+._-/".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(super) fn audit_unavailable() -> ErrorReply {
    ErrorReply::error(
        "58030",
        "stepgate: audit log unavailable; guarded statement refused",
    )
}
