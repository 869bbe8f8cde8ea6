//! GnuPG interoperability of the token signature layer: what gpg signs, stepgate verifies, and what
//! stepgate signs, gpg verifies. Uses a throwaway GNUPGHOME.

mod common;

use std::time::SystemTime;

use common::gnupg::GnuPg;

use openpgp::cert::prelude::*;
use openpgp::parse::Parse;
use openpgp::serialize::Serialize;
use sequoia_openpgp as openpgp;
use stepgate::token::signed::{sign_cleartext, verify, Keyring};

const PAYLOAD: &str =
    "stepgate-token: 1\nid: 7d4c0a6e-5b1f-4f0e-9a53-2f1e9c0b8d11\ndatabase: app\n";

#[test]
fn gpg_signatures_verify_in_every_form() {
    let gpg = GnuPg::new();
    let alice = gpg.generate("Alice <alice@example.com>", "ed25519");
    let bob = gpg.generate("Bob <bob@example.com>", "rsa3072");
    let mut ring = Keyring::default();
    for uid in ["alice@example.com", "bob@example.com"] {
        ring.certs.push(Cert::from_bytes(&gpg.export(uid)).unwrap());
    }
    let file = gpg.path("payload.txt");
    std::fs::write(&file, PAYLOAD).unwrap();
    let f = file.to_str().unwrap();
    let forms: Vec<(&str, Vec<&str>, usize)> = vec![
        (
            "clearsign",
            vec!["--clearsign", "-u", "alice@example.com", "-o", "-", f],
            1,
        ),
        (
            "sign --armor",
            vec!["--sign", "--armor", "-u", "bob@example.com", "-o", "-", f],
            1,
        ),
        (
            "sign (binary, compressed)",
            vec!["--sign", "-u", "alice@example.com", "-o", "-", f],
            1,
        ),
        (
            "clearsign -u A -u B",
            vec![
                "--clearsign",
                "-u",
                "alice@example.com",
                "-u",
                "bob@example.com",
                "-o",
                "-",
                f,
            ],
            2,
        ),
    ];
    for (what, args, signers) in forms {
        let (ok, out, err) = gpg.run(&args, None);
        assert!(ok, "{what}: {err}");
        let signed =
            verify(&out, &ring, SystemTime::now()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            String::from_utf8_lossy(&signed.payload),
            PAYLOAD.trim_end(),
            "{what}"
        );
        assert_eq!(signed.signers.len(), signers, "{what}");
        let fprs: Vec<&str> = signed
            .signers
            .iter()
            .map(|s| s.fingerprint.as_str())
            .collect();
        assert!(
            fprs.contains(&alice.as_str()) || fprs.contains(&bob.as_str()),
            "{what}: {fprs:?}"
        );
    }
}

#[test]
fn what_stepgate_signs_gpg_verifies() {
    let gpg = GnuPg::new();
    let (cert, _) = CertBuilder::general_purpose(Some("Carol <carol@example.com>"))
        .set_cipher_suite(CipherSuite::Cv25519)
        .set_creation_time(SystemTime::now() - std::time::Duration::from_secs(600))
        .generate()
        .unwrap();
    let signed = sign_cleartext(
        PAYLOAD.as_bytes(),
        std::slice::from_ref(&cert),
        SystemTime::now(),
    )
    .unwrap();
    let public = gpg.path("carol.asc");
    let mut armored = Vec::new();
    cert.armored().serialize(&mut armored).unwrap();
    std::fs::write(&public, armored).unwrap();
    let (ok, _, err) = gpg.run(&["--import", public.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let token = gpg.path("token.asc");
    std::fs::write(&token, &signed).unwrap();
    let (ok, _, err) = gpg.run(&["--verify", token.to_str().unwrap()], None);
    assert!(ok, "gpg --verify failed: {err}");
    assert!(
        err.contains("Good signature from \"Carol <carol@example.com>\""),
        "{err}"
    );
}
