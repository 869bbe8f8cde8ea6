//! Step-up tokens (DESIGN.md "Tokens"). Today: the payload format a signer reads and signs
//! ([`payload`]). The OpenPGP layer, verification against the keyring and policy, replay protection and the
//! `stepgate token` commands build on it.

pub mod payload;
pub mod signed;
pub mod verify;

pub use payload::{Payload, PayloadError, StatementGrant};
