//! Step-up tokens (DESIGN.md "Tokens"): the payload a signer reads and signs ([`payload`]), the OpenPGP
//! layer ([`signed`]), verification against the keyring and the policy ([`verify`]), and what a session and
//! the server keep at run time: the verified token and the ledger of spent uses ([`grant`]).

pub mod cli;
pub mod grant;
pub mod payload;
pub mod signed;
pub mod verify;

pub use grant::{ActiveToken, Ledger, Policy};
pub use payload::{Payload, PayloadError, StatementGrant};
pub use verify::{Authorization, Reason, SignerPolicy};
