//! Token verification against policy: which signers count, and whether the token fits the session and the
//! clock. Pure: the keyring, the policy, the session and the time are all passed in.
//!
//! Order of checks: signatures ([`super::signed`]), payload grammar ([`super::payload`]), the listed
//! classes against the classifier's, instance, database, user, validity window, then the signers: distinct
//! primary keys named in the policy, allowed for the session's database and for the class of every listed
//! statement, whose signature is no older than the rule's maximum token lifetime allows; at least the rule's
//! number of them. Each refusal carries DESIGN.md's reason code.

use std::time::{Duration, SystemTime};

use thiserror::Error;

pub use crate::audit::ReasonCode;

use super::payload::{Payload, PayloadError};
use super::signed::{self, Keyring, SignatureError, SignerInfo};
use crate::classify::{lex, Class, Classifier};

pub use crate::config::SignerPolicy;

/// What the session's rule and the config demand of a token.
pub struct TokenPolicy<'a> {
    pub keyring: &'a Keyring,
    pub signers: &'a [SignerPolicy],
    /// When set, tokens must name this instance.
    pub instance: Option<&'a str>,
    pub signatures_required: usize,
    pub max_token_lifetime: Duration,
    pub classifier: &'a Classifier,
}

/// Why a token is refused. [`Reason::code`] is the reason code of DESIGN.md.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Reason {
    #[error("{0}")]
    Signature(#[from] SignatureError),
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("signature_too_old: {signer} signed more than {max:?} before not-after")]
    SignatureTooOld { signer: String, max: Duration },
    #[error("signer_not_allowed: {0}")]
    SignerNotAllowed(String),
    #[error("not_enough_signers (have {have} of {need})")]
    NotEnoughSigners { have: usize, need: usize },
    #[error("token_expired")]
    TokenExpired,
    #[error("token_not_yet_valid")]
    TokenNotYetValid,
    #[error("wrong_instance: the token names {0:?}")]
    WrongInstance(String),
    #[error("wrong_database: the token names {0:?}")]
    WrongDatabase(String),
    #[error("wrong_user: the token names {0:?}")]
    WrongUser(String),
}

impl Reason {
    pub fn code(&self) -> ReasonCode {
        match self {
            Reason::Signature(s) => s.code(),
            Reason::Malformed(_) => ReasonCode::Malformed,
            Reason::SignatureTooOld { .. } => ReasonCode::SignatureTooOld,
            Reason::SignerNotAllowed(_) => ReasonCode::SignerNotAllowed,
            Reason::NotEnoughSigners { .. } => ReasonCode::NotEnoughSigners,
            Reason::TokenExpired => ReasonCode::TokenExpired,
            Reason::TokenNotYetValid => ReasonCode::TokenNotYetValid,
            Reason::WrongInstance(_) => ReasonCode::WrongInstance,
            Reason::WrongDatabase(_) => ReasonCode::WrongDatabase,
            Reason::WrongUser(_) => ReasonCode::WrongUser,
        }
    }
}

impl From<PayloadError> for Reason {
    fn from(e: PayloadError) -> Self {
        Reason::Malformed(match e {
            PayloadError::Line { line, message } => format!("line {line}: {message}"),
            other => other
                .to_string()
                .trim_start_matches("malformed: ")
                .to_string(),
        })
    }
}

/// A verified token: what it authorizes and who vouched for it.
#[derive(Debug, Clone)]
pub struct Authorization {
    pub payload: Payload,
    /// The signers that count, with their policy names.
    pub signers: Vec<(SignerInfo, String)>,
    /// When this verification must be redone: the token's not-after or the first expiry of a signing key.
    pub valid_until: SystemTime,
}

use crate::config::pattern_matches;

/// The class of one statement's text, as the gate judges it.
pub fn class_of(classifier: &Classifier, sql: &str) -> Result<Class, lex::LexError> {
    let tokens = lex::lex(sql, true)?;
    let sig: Vec<_> = lex::significant(&tokens)
        .into_iter()
        .filter(|t| t.kind != lex::Kind::Semicolon)
        .collect();
    Ok(classifier.judge(&sig).class)
}

/// Verifies `token` for a session of `user` on `database` at `now`.
pub fn verify_token(
    token: &[u8],
    policy: &TokenPolicy<'_>,
    database: &str,
    user: &str,
    now: SystemTime,
) -> Result<Authorization, Reason> {
    let signed = signed::verify(token, policy.keyring, now)?;
    let payload = Payload::parse(&signed.payload)?;
    for (i, g) in payload.statements.iter().enumerate() {
        let class = class_of(policy.classifier, &g.sql)
            .map_err(|e| Reason::Malformed(format!("statement {}: {e}", i + 1)))?;
        if class != g.class {
            return Err(Reason::Malformed(format!(
                "statement {} is listed as {} but is {class}: {}",
                i + 1,
                g.class,
                g.sql
            )));
        }
    }
    if let Some(instance) = policy.instance {
        if payload.instance.as_deref() != Some(instance) {
            return Err(Reason::WrongInstance(
                payload.instance.clone().unwrap_or_default(),
            ));
        }
    }
    if payload.database != database {
        return Err(Reason::WrongDatabase(payload.database.clone()));
    }
    if let Some(u) = &payload.user {
        if u != user {
            return Err(Reason::WrongUser(u.clone()));
        }
    }
    if payload.not_before.is_some_and(|nb| now < nb) {
        return Err(Reason::TokenNotYetValid);
    }
    if now > payload.not_after {
        return Err(Reason::TokenExpired);
    }
    let mut counting = Vec::new();
    let mut refused = Vec::new();
    for s in &signed.signers {
        let Some(p) = policy
            .signers
            .iter()
            .find(|p| p.fingerprint.eq_ignore_ascii_case(&s.fingerprint))
        else {
            refused.push(format!(
                "{} ({}) is not a [[signer]]",
                s.user_id, s.fingerprint
            ));
            continue;
        };
        if !p.databases.iter().any(|d| pattern_matches(d, database)) {
            refused.push(format!(
                "{} may not authorize in database {database:?}",
                p.name
            ));
            continue;
        }
        if let Some(g) = payload
            .statements
            .iter()
            .find(|g| !p.classes.contains(&g.class))
        {
            refused.push(format!(
                "{} may not authorize {} statements",
                p.name, g.class
            ));
            continue;
        }
        let lifetime = payload
            .not_after
            .duration_since(s.signed_at)
            .unwrap_or_default();
        if lifetime > policy.max_token_lifetime {
            return Err(Reason::SignatureTooOld {
                signer: p.name.clone(),
                max: policy.max_token_lifetime,
            });
        }
        counting.push((s.clone(), p.name.clone()));
    }
    if counting.is_empty() && !refused.is_empty() {
        return Err(Reason::SignerNotAllowed(refused.join("; ")));
    }
    if counting.len() < policy.signatures_required {
        return Err(Reason::NotEnoughSigners {
            have: counting.len(),
            need: policy.signatures_required,
        });
    }
    let valid_until = counting
        .iter()
        .filter_map(|(s, _)| s.key_expires)
        .fold(payload.not_after, SystemTime::min);
    Ok(Authorization {
        valid_until,
        payload,
        signers: counting,
    })
}

#[cfg(test)]
mod tests {
    use super::super::payload::fingerprint_of;
    use super::super::signed::sign_cleartext;
    use super::*;
    use sequoia_openpgp::cert::prelude::*;

    fn key(name: &str) -> Cert {
        CertBuilder::general_purpose(Some(format!("{name} <{name}@example.com>")))
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_creation_time(SystemTime::now() - Duration::from_secs(7200))
            .generate()
            .unwrap()
            .0
    }

    fn signer(name: &str, cert: &Cert, databases: &[&str], classes: &[Class]) -> SignerPolicy {
        SignerPolicy {
            name: name.into(),
            fingerprint: cert.fingerprint().to_hex(),
            databases: databases.iter().map(|s| s.to_string()).collect(),
            classes: classes.to_vec(),
        }
    }

    fn payload(extra: &str, not_after: &str) -> String {
        let sql = "DROP TABLE staging_orders";
        format!(
            "stepgate-token: 1\nid: 7d4c0a6e-5b1f-4f0e-9a53-2f1e9c0b8d11\n{extra}database: app\nnot-after: {not_after}\nstatement: {} destructive \"{sql}\"\n",
            fingerprint_of(sql).unwrap()
        )
    }

    fn in_minutes(m: u64) -> String {
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(m * 60))
            .to_string()
    }

    struct Fixture {
        alice: Cert,
        bob: Cert,
        keyring: Keyring,
        signers: Vec<SignerPolicy>,
        classifier: Classifier,
    }

    fn fixture() -> Fixture {
        let (alice, bob) = (key("alice"), key("bob"));
        let keyring = Keyring {
            certs: vec![
                alice.clone().strip_secret_key_material(),
                bob.clone().strip_secret_key_material(),
            ],
        };
        let all = [
            Class::Ddl,
            Class::Destructive,
            Class::Privileged,
            Class::Unparsed,
        ];
        let signers = vec![
            signer("alice", &alice, &["*"], &all),
            signer("bob", &bob, &["app"], &[Class::Ddl]),
        ];
        Fixture {
            alice,
            bob,
            keyring,
            signers,
            classifier: Classifier::default(),
        }
    }

    impl Fixture {
        fn policy(&self, required: usize) -> TokenPolicy<'_> {
            TokenPolicy {
                keyring: &self.keyring,
                signers: &self.signers,
                instance: None,
                signatures_required: required,
                max_token_lifetime: Duration::from_secs(3600),
                classifier: &self.classifier,
            }
        }
    }

    fn sign(text: &str, who: &[&Cert]) -> Vec<u8> {
        let certs: Vec<Cert> = who.iter().map(|c| (*c).clone()).collect();
        sign_cleartext(text.as_bytes(), &certs, SystemTime::now()).unwrap()
    }

    fn code(r: Result<Authorization, Reason>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(e) => e.code().as_str(),
        }
    }

    #[test]
    fn a_good_token_authorizes_its_statements() {
        let f = fixture();
        let t = sign(&payload("", &in_minutes(30)), &[&f.alice]);
        let a = verify_token(&t, &f.policy(1), "app", "migrator", SystemTime::now()).unwrap();
        assert_eq!(a.signers.len(), 1);
        assert_eq!(a.signers[0].1, "alice");
        assert_eq!(a.payload.statements[0].sql, "DROP TABLE staging_orders");
    }

    #[test]
    fn every_reason_code() {
        let f = fixture();
        let now = SystemTime::now();
        let ok = payload("", &in_minutes(30));
        let p1 = f.policy(1);
        assert_eq!(
            code(verify_token(
                &sign(&ok, &[&f.alice]),
                &p1,
                "other",
                "u",
                now
            )),
            "wrong_database"
        );
        let with_user = payload("user: migrator\n", &in_minutes(30));
        assert_eq!(
            code(verify_token(
                &sign(&with_user, &[&f.alice]),
                &p1,
                "app",
                "intruder",
                now
            )),
            "wrong_user"
        );
        let expired = payload("", "2020-01-01T00:00:00Z");
        assert_eq!(
            code(verify_token(
                &sign(&expired, &[&f.alice]),
                &p1,
                "app",
                "u",
                now
            )),
            "token_expired"
        );
        let later = payload(
            &format!("not-before: {}\n", in_minutes(10)),
            &in_minutes(30),
        );
        assert_eq!(
            code(verify_token(
                &sign(&later, &[&f.alice]),
                &p1,
                "app",
                "u",
                now
            )),
            "token_not_yet_valid"
        );
        let too_long = payload("", &in_minutes(24 * 60));
        assert_eq!(
            code(verify_token(
                &sign(&too_long, &[&f.alice]),
                &p1,
                "app",
                "u",
                now
            )),
            "signature_too_old"
        );
        // bob may only sign ddl.
        assert_eq!(
            code(verify_token(&sign(&ok, &[&f.bob]), &p1, "app", "u", now)),
            "signer_not_allowed"
        );
        // Two required: alice alone, or alice twice, is not enough.
        let p2 = f.policy(2);
        let e = verify_token(&sign(&ok, &[&f.alice]), &p2, "app", "u", now).unwrap_err();
        assert_eq!(e.to_string(), "not_enough_signers (have 1 of 2)");
        let mut twice = sign(&ok, &[&f.alice]);
        twice.extend(sign(&ok, &[&f.alice]));
        assert_eq!(
            code(verify_token(&twice, &p2, "app", "u", now)),
            "not_enough_signers"
        );
        // Instance.
        let mut pi = f.policy(1);
        pi.instance = Some("prod-eu1");
        assert_eq!(
            code(verify_token(&sign(&ok, &[&f.alice]), &pi, "app", "u", now)),
            "wrong_instance"
        );
        let named = payload("instance: prod-eu1\n", &in_minutes(30));
        assert_eq!(
            code(verify_token(
                &sign(&named, &[&f.alice]),
                &pi,
                "app",
                "u",
                now
            )),
            "ok"
        );
        // A class that lies about its statement.
        let lie = ok.replace("destructive", "ddl");
        assert_eq!(
            code(verify_token(&sign(&lie, &[&f.bob]), &p1, "app", "u", now)),
            "malformed"
        );
        // Tampered, unknown key.
        let tampered = String::from_utf8(sign(&ok, &[&f.alice]))
            .unwrap()
            .replace("staging_orders", "orders_xxxxxxx");
        assert_eq!(
            code(verify_token(tampered.as_bytes(), &p1, "app", "u", now)),
            "bad_signature"
        );
        let stranger = key("stranger");
        assert_eq!(
            code(verify_token(&sign(&ok, &[&stranger]), &p1, "app", "u", now)),
            "unknown_key"
        );
    }
}
