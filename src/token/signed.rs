//! The OpenPGP layer of a token: the signed forms stepgate accepts, and which keys signed.
//!
//! Accepted: a cleartext-signed message (`gpg --clearsign`, `sq sign --cleartext-signature`, `stepgate token
//! sign`), an inline-signed message, armored or binary and possibly compressed (`gpg --sign [--armor]`),
//! several armored signed messages concatenated (one per signer, the same payload in each), and the one-line
//! base64 of any of these, or `deflate:` and base64 of one deflated (`stepgate token pack`). Limits: 64 KiB of token, 64 KiB of payload, 8 signatures.
//!
//! Every signature must verify cryptographically; one bad signature rejects the token. Signatures by keys
//! outside the keyring are ignored. A signing key must be alive and unrevoked *now*, not only when it signed
//! (OpenPGP judges a signature by the key's state at signing time). What the signers may authorize is the
//! policy's business, not this module's.

use std::io::Read;
use std::path::Path;
use std::time::SystemTime;

use base64::Engine as _;
use openpgp::cert::prelude::*;
use openpgp::parse::stream::{
    GoodChecksum, MessageLayer, MessageStructure, VerificationError, VerificationHelper,
    VerifierBuilder,
};
use openpgp::parse::Parse;
use openpgp::policy::StandardPolicy;
use openpgp::types::RevocationStatus;
use openpgp::{Cert, KeyHandle};
use sequoia_openpgp as openpgp;
use thiserror::Error;

use super::payload::MAX_PAYLOAD;

/// Largest token string accepted.
pub const MAX_TOKEN: usize = 64 * 1024;
/// Most signatures accepted in one token.
pub const MAX_SIGNATURES: usize = 8;
/// How far a signer's clock may run ahead of ours: a signature made "in the future" by less than this is
/// still accepted (keys are still judged at the real time).
pub const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

/// Why a token's signatures do not hold. `code()` is the reason code of DESIGN.md.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignatureError {
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("bad_signature: {0}")]
    BadSignature(String),
    #[error("unknown_key: no signature by a key in the keyring")]
    UnknownKey,
    #[error("key_expired: key {0} is not alive now")]
    KeyExpired(String),
    #[error("key_revoked: key {0} is revoked")]
    KeyRevoked(String),
}

impl SignatureError {
    pub fn code(&self) -> crate::audit::ReasonCode {
        use crate::audit::ReasonCode;
        match self {
            SignatureError::Malformed(_) => ReasonCode::Malformed,
            SignatureError::BadSignature(_) => ReasonCode::BadSignature,
            SignatureError::UnknownKey => ReasonCode::UnknownKey,
            SignatureError::KeyExpired(_) => ReasonCode::KeyExpired,
            SignatureError::KeyRevoked(_) => ReasonCode::KeyRevoked,
        }
    }
}

/// A key that made a good signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerInfo {
    /// Primary key fingerprint, uppercase hex.
    pub fingerprint: String,
    /// The certificate's primary user id (e.g. `Alice <alice@example.com>`).
    pub user_id: String,
    /// When the signature was made.
    pub signed_at: SystemTime,
    /// When the certificate or the signing key expires, whichever is first.
    pub key_expires: Option<SystemTime>,
}

/// A token whose signatures verified.
#[derive(Debug, Clone)]
pub struct Signed {
    pub payload: Vec<u8>,
    /// Distinct primary keys from the keyring that signed, in order of appearance.
    pub signers: Vec<SignerInfo>,
}

/// Public keys stepgate trusts to sign (which of them may authorize what is the policy's business).
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    pub certs: Vec<Cert>,
}

/// A keyring file or directory that cannot be read or parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path}: {message}")]
pub struct KeyringError {
    pub path: String,
    pub message: String,
}

impl Keyring {
    /// Loads armored or binary public keys from one file, or from every file of a directory.
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        let at = |p: &Path| {
            let path = p.display().to_string();
            move |e: &dyn std::fmt::Display| KeyringError {
                path,
                message: e.to_string(),
            }
        };
        let mut files = Vec::new();
        if path.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(path)
                .map_err(|e| at(path)(&e))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.to_path_buf());
        }
        let mut certs = Vec::new();
        for f in files {
            let bytes = std::fs::read(&f).map_err(|e| at(&f)(&e))?;
            // A README or a stray file in the keys directory reads as "unexpected EOF" to the parser: say
            // what it is instead.
            let not_a_key = |e: &dyn std::fmt::Display| {
                at(&f)(&format!(
                    "not an OpenPGP key (export one with gpg --export --armor NAME): {e}"
                ))
            };
            for cert in CertParser::from_bytes(&bytes).map_err(|e| not_a_key(&e))? {
                certs.push(cert.map_err(|e| not_a_key(&e))?);
            }
        }
        Ok(Keyring { certs })
    }
}

/// Marks the compressed one-line form of a token (`stepgate token pack`): `deflate:` then base64 of the
/// deflated token.
pub const PACKED_PREFIX: &str = "deflate:";

/// The token as bytes OpenPGP can parse: the one-line forms (`deflate:` + base64, or base64) are decoded
/// first.
fn unwrap_base64(token: &[u8]) -> Result<Vec<u8>, SignatureError> {
    let trimmed = token.trim_ascii();
    if let Some(packed) = trimmed.strip_prefix(PACKED_PREFIX.as_bytes()) {
        let deflated = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(packed)
            .or_else(|_| base64::engine::general_purpose::STANDARD.decode(packed))
            .map_err(|e| {
                SignatureError::Malformed(format!("a packed token that is not base64: {e}"))
            })?;
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(deflated.as_slice())
            .take(MAX_TOKEN as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| {
                SignatureError::Malformed(format!("a packed token that does not inflate: {e}"))
            })?;
        if out.len() > MAX_TOKEN {
            return Err(SignatureError::Malformed(format!(
                "a packed token that inflates past the limit of {MAX_TOKEN} bytes"
            )));
        }
        return Ok(out);
    }
    let looks_base64 = !trimmed.is_empty()
        && !trimmed.starts_with(b"-----")
        && trimmed
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'));
    if !looks_base64 {
        return Ok(token.to_vec());
    }
    base64::engine::general_purpose::STANDARD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(trimmed))
        .map_err(|e| {
            SignatureError::Malformed(format!("not base64 and not an OpenPGP message: {e}"))
        })
}

/// Splits concatenated armored messages; a binary message is one message.
fn messages(bytes: &[u8]) -> Result<Vec<&[u8]>, SignatureError> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(vec![bytes]);
    };
    if !text.trim_start().starts_with("-----BEGIN PGP") {
        return Ok(vec![bytes]);
    }
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN PGP") {
        let block = &rest[start..];
        let end_marker = if block.starts_with("-----BEGIN PGP SIGNED MESSAGE-----") {
            "-----END PGP SIGNATURE-----"
        } else {
            "-----END PGP MESSAGE-----"
        };
        let end = block.find(end_marker).ok_or_else(|| {
            SignatureError::Malformed(format!("armored block without {end_marker}"))
        })? + end_marker.len();
        out.push(&block.as_bytes()[..end]);
        rest = &block[end..];
    }
    if !rest.trim().is_empty() {
        return Err(SignatureError::Malformed(
            "text after the last armored block".into(),
        ));
    }
    Ok(out)
}

struct Helper<'a> {
    keyring: &'a Keyring,
    policy: &'a StandardPolicy<'a>,
    now: SystemTime,
    signers: Vec<SignerInfo>,
    error: Option<SignatureError>,
    signatures: usize,
}

impl Helper<'_> {
    fn good(&mut self, g: &GoodChecksum<'_>) {
        let cert = g.ka.cert();
        let fpr = cert.fingerprint().to_hex();
        // The key must be usable now, not only when it signed.
        match cert.with_policy(self.policy, self.now) {
            Ok(vc) => {
                if let RevocationStatus::Revoked(_) = vc.revocation_status() {
                    self.error.get_or_insert(SignatureError::KeyRevoked(fpr));
                    return;
                }
                if vc.alive().is_err() {
                    self.error.get_or_insert(SignatureError::KeyExpired(fpr));
                    return;
                }
                let handle = g.ka.key().key_handle();
                let mut key_expires = vc.primary_key().key_expiration_time();
                match vc.keys().key_handle(handle).next() {
                    Some(k) if matches!(k.revocation_status(), RevocationStatus::Revoked(_)) => {
                        self.error.get_or_insert(SignatureError::KeyRevoked(fpr));
                        return;
                    }
                    Some(k) if k.alive().is_err() => {
                        self.error.get_or_insert(SignatureError::KeyExpired(fpr));
                        return;
                    }
                    Some(k) => {
                        if let Some(t) = k.key_expiration_time() {
                            key_expires = Some(key_expires.map_or(t, |e| e.min(t)));
                        }
                    }
                    None => {
                        self.error.get_or_insert(SignatureError::KeyExpired(fpr));
                        return;
                    }
                }
                let user_id = vc
                    .primary_userid()
                    .map(|u| String::from_utf8_lossy(u.userid().value()).into_owned())
                    .unwrap_or_default();
                let signed_at = g
                    .sig
                    .signature_creation_time()
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                if !self.signers.iter().any(|s| s.fingerprint == fpr) {
                    self.signers.push(SignerInfo {
                        fingerprint: fpr,
                        user_id,
                        signed_at,
                        key_expires,
                    });
                }
            }
            Err(e) => {
                let text = e.to_string();
                let err = if text.contains("revoked") {
                    SignatureError::KeyRevoked(fpr)
                } else {
                    SignatureError::KeyExpired(fpr)
                };
                self.error.get_or_insert(err);
            }
        }
    }
}

impl VerificationHelper for Helper<'_> {
    fn get_certs(&mut self, ids: &[KeyHandle]) -> openpgp::Result<Vec<Cert>> {
        Ok(self
            .keyring
            .certs
            .iter()
            .filter(|c| {
                c.keys()
                    .any(|k| ids.iter().any(|id| id.aliases(k.key().key_handle())))
            })
            .cloned()
            .collect())
    }

    fn check(&mut self, structure: MessageStructure) -> openpgp::Result<()> {
        for layer in structure.into_iter() {
            match layer {
                MessageLayer::SignatureGroup { results } => {
                    for r in results {
                        self.signatures += 1;
                        match r {
                            Ok(g) => self.good(&g),
                            // Signatures by keys outside the keyring are ignored.
                            Err(VerificationError::MissingKey { .. }) => {}
                            Err(VerificationError::BadKey { ka, error, .. }) => {
                                let fpr = ka.cert().fingerprint().to_hex();
                                let text = error.to_string();
                                self.error.get_or_insert(if text.contains("revoked") {
                                    SignatureError::KeyRevoked(fpr)
                                } else if text.contains("xpired") || text.contains("not alive") {
                                    SignatureError::KeyExpired(fpr)
                                } else {
                                    SignatureError::BadSignature(text)
                                });
                            }
                            Err(e) => {
                                self.error
                                    .get_or_insert(SignatureError::BadSignature(e.to_string()));
                            }
                        }
                    }
                }
                MessageLayer::Compression { .. } => {}
                MessageLayer::Encryption { .. } => {
                    self.error.get_or_insert(SignatureError::Malformed(
                        "an encrypted message is not a token".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Verifies the signatures of a token and returns its payload and signers.
pub fn verify(token: &[u8], keyring: &Keyring, now: SystemTime) -> Result<Signed, SignatureError> {
    if token.len() > MAX_TOKEN {
        return Err(SignatureError::Malformed(format!(
            "token of {} bytes exceeds the limit of {MAX_TOKEN} bytes",
            token.len()
        )));
    }
    let bytes = unwrap_base64(token)?;
    if bytes.trim_ascii_start().starts_with(b"stepgate-token:") {
        return Err(SignatureError::Malformed(
            "not signed: this is the payload itself; sign it with gpg --clearsign (or stepgate token sign --key KEY)".into(),
        ));
    }
    let policy = StandardPolicy::new();
    let mut payload: Option<Vec<u8>> = None;
    let mut signers: Vec<SignerInfo> = Vec::new();
    let mut total_signatures = 0;
    for message in messages(&bytes)? {
        let helper = Helper {
            keyring,
            policy: &policy,
            now,
            signers: Vec::new(),
            error: None,
            signatures: 0,
        };
        let mut verifier = VerifierBuilder::from_bytes(message)
            .and_then(|b| b.with_policy(&policy, Some(now + CLOCK_SKEW), helper))
            .map_err(|e| classify_parse_error(&e))?;
        let mut data = Vec::new();
        verifier
            .by_ref()
            .take(MAX_PAYLOAD as u64 + 1)
            .read_to_end(&mut data)
            .map_err(|e| SignatureError::BadSignature(e.to_string()))?;
        if data.len() > MAX_PAYLOAD {
            return Err(SignatureError::Malformed(format!(
                "payload exceeds {MAX_PAYLOAD} bytes"
            )));
        }
        if !verifier.message_processed() {
            return Err(SignatureError::Malformed(
                "trailing data after the signed message".into(),
            ));
        }
        let helper = verifier.into_helper();
        if let Some(e) = helper.error {
            return Err(e);
        }
        total_signatures += helper.signatures;
        if total_signatures > MAX_SIGNATURES {
            return Err(SignatureError::Malformed(format!(
                "more than {MAX_SIGNATURES} signatures"
            )));
        }
        let data = normalize(data);
        match &payload {
            None => payload = Some(data),
            Some(p) if *p == data => {}
            Some(_) => {
                return Err(SignatureError::Malformed(
                    "the signed messages carry different payloads".into(),
                ))
            }
        }
        for s in helper.signers {
            if !signers.iter().any(|x| x.fingerprint == s.fingerprint) {
                signers.push(s);
            }
        }
    }
    let payload = payload.ok_or_else(|| SignatureError::Malformed("no signed message".into()))?;
    if signers.is_empty() {
        return Err(SignatureError::UnknownKey);
    }
    Ok(Signed { payload, signers })
}

/// Cleartext signatures drop the final newline; inline ones keep it. Compare payloads without it.
fn normalize(mut data: Vec<u8>) -> Vec<u8> {
    if data.ends_with(b"\r\n") {
        data.truncate(data.len() - 2);
    } else if data.ends_with(b"\n") {
        data.truncate(data.len() - 1);
    }
    data
}

fn classify_parse_error(e: &anyhow::Error) -> SignatureError {
    let text = e.to_string();
    if text.contains("signature") && (text.contains("bad") || text.contains("Bad")) {
        SignatureError::BadSignature(text)
    } else {
        SignatureError::Malformed(text)
    }
}

/// Signs `payload` as one cleartext-signed message with every key in `signers` (secret keys, unprotected
/// or already decrypted). GnuPG verifies what this makes (`gpg --verify`).
pub fn sign_cleartext(
    payload: &[u8],
    signers: &[Cert],
    now: SystemTime,
) -> Result<Vec<u8>, String> {
    sign_cleartext_with(payload, signers, now, None)
}

/// The key of `cert` that can sign at `now`, with its secret material (possibly still encrypted).
fn signing_key(
    cert: &Cert,
    now: SystemTime,
) -> Option<
    openpgp::packet::Key<openpgp::packet::key::SecretParts, openpgp::packet::key::UnspecifiedRole>,
> {
    cert.keys()
        .with_policy(&StandardPolicy::new(), now)
        .supported()
        .alive()
        .revoked(false)
        .for_signing()
        .secret()
        .next()
        .map(|k| k.key().clone())
}

/// Whether any of these keys' signing secrets is protected by a passphrase.
pub fn needs_passphrase(signers: &[Cert], now: SystemTime) -> bool {
    signers
        .iter()
        .any(|cert| signing_key(cert, now).is_some_and(|k| !k.has_unencrypted_secret()))
}

/// One key pair per signer, decrypting protected keys with `passphrase`.
fn keypairs(
    signers: &[Cert],
    now: SystemTime,
    passphrase: Option<&str>,
) -> Result<Vec<openpgp::crypto::KeyPair>, String> {
    let mut pairs = Vec::new();
    for cert in signers {
        let mut secret = signing_key(cert, now).ok_or_else(|| {
            format!(
                "key {} has no usable signing key with secret material",
                cert.fingerprint()
            )
        })?;
        if !secret.has_unencrypted_secret() {
            let Some(p) = passphrase else {
                return Err(format!(
                    "key {} is protected by a passphrase (set STEPGATE_PASSPHRASE)",
                    cert.fingerprint()
                ));
            };
            secret = secret
                .decrypt_secret(&p.into())
                .map_err(|_| format!("key {}: wrong passphrase", cert.fingerprint()))?;
        }
        pairs.push(secret.into_keypair().map_err(|e| {
            format!(
                "key {}: {e} (is it protected by a passphrase?)",
                cert.fingerprint()
            )
        })?);
    }
    if pairs.is_empty() {
        return Err("no signing key given".into());
    }
    Ok(pairs)
}

/// [`sign_cleartext`] with a passphrase for protected secret keys.
pub fn sign_cleartext_with(
    payload: &[u8],
    signers: &[Cert],
    now: SystemTime,
    passphrase: Option<&str>,
) -> Result<Vec<u8>, String> {
    sign(payload, signers, now, passphrase, Form::Cleartext)
}

/// An inline-signed message (what `gpg --sign [--armor]` makes), unprotected keys only.
pub fn sign_inline(
    payload: &[u8],
    signers: &[Cert],
    now: SystemTime,
    armor: bool,
) -> Result<Vec<u8>, String> {
    sign(payload, signers, now, None, Form::Inline { armor })
}

enum Form {
    Cleartext,
    Inline { armor: bool },
}

fn sign(
    payload: &[u8],
    signers: &[Cert],
    now: SystemTime,
    passphrase: Option<&str>,
    form: Form,
) -> Result<Vec<u8>, String> {
    use openpgp::serialize::stream::{Armorer, LiteralWriter, Message, Signer};
    use std::io::Write;
    let e = |e: anyhow::Error| e.to_string();
    let mut pairs = keypairs(signers, now, passphrase)?.into_iter();
    let first = pairs.next().ok_or("no signing key given")?;
    let mut out = Vec::new();
    let mut message = Message::new(&mut out);
    if let Form::Inline { armor: true } = form {
        message = Armorer::new(message).build().map_err(e)?;
    }
    let mut signer = Signer::new(message, first).map_err(e)?;
    if let Form::Cleartext = form {
        signer = signer.cleartext();
    }
    for k in pairs {
        signer = signer.add_signer(k).map_err(e)?;
    }
    let signer = signer.creation_time(now).build().map_err(e)?;
    let mut w = match form {
        Form::Cleartext => signer,
        Form::Inline { .. } => LiteralWriter::new(signer).build().map_err(e)?,
    };
    w.write_all(payload).map_err(|e| e.to_string())?;
    w.finalize().map_err(e)?;
    Ok(out)
}

#[cfg(test)]
#[path = "signed_tests.rs"]
mod tests;
