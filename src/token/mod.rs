//! Step-up tokens (DESIGN.md "Tokens"): the payload a signer reads and signs ([`payload`]), the OpenPGP
//! layer ([`signed`]), verification against the keyring and the policy ([`verify`]), and what a session and
//! the server keep at run time: the verified token and the ledger of spent uses ([`grant`]).

pub mod approvals;
pub mod grant;
pub mod held;
pub mod payload;
pub mod signed;
pub mod signers;
pub mod verify;

pub use grant::{ActiveToken, Ledger, Policy};
pub use payload::{Payload, PayloadError, StatementGrant};
pub use verify::{Authorization, Reason, SignerPolicy};

/// A fresh random (version 4) UUID.
pub fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = crate::audit::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

pub use signed::PACKED_PREFIX;

/// `stepgate token pack`: the one-line form for PGOPTIONS — `deflate:` and base64 of the deflated token (a
/// 50-statement token packs to a third of its armored size). Plain base64 of the token is read too.
pub fn pack(token: &[u8]) -> String {
    use base64::Engine as _;
    use std::io::Write as _;
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing to a Vec cannot fail.
    let _ = z.write_all(token.trim_ascii());
    let deflated = z.finish().unwrap_or_default();
    format!(
        "{PACKED_PREFIX}{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(deflated)
    )
}
