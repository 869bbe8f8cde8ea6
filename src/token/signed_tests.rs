//! Unit tests of `signed` (kept in their own file).

use super::*;
use openpgp::serialize::Serialize;
use std::time::Duration;

const PAYLOAD: &[u8] = b"stepgate-token: 1\nid: 7d4c0a6e-5b1f-4f0e-9a53-2f1e9c0b8d11\n";

fn key(name: &str) -> Cert {
    CertBuilder::general_purpose(Some(format!("{name} <{name}@example.com>")))
        .set_cipher_suite(CipherSuite::Cv25519)
        .set_creation_time(SystemTime::now() - Duration::from_secs(3600))
        .generate()
        .unwrap()
        .0
}

fn ring(certs: &[&Cert]) -> Keyring {
    Keyring {
        certs: certs
            .iter()
            .map(|c| (*c).clone().strip_secret_key_material())
            .collect(),
    }
}

fn inline(payload: &[u8], cert: &Cert, armor: bool) -> Vec<u8> {
    sign_inline(
        payload,
        std::slice::from_ref(cert),
        SystemTime::now(),
        armor,
    )
    .unwrap()
}

#[test]
fn cleartext_inline_binary_and_base64_forms() {
    let alice = key("alice");
    let keys = ring(&[&alice]);
    let now = SystemTime::now();
    let clear = sign_cleartext(PAYLOAD, std::slice::from_ref(&alice), now).unwrap();
    assert!(clear.starts_with(b"-----BEGIN PGP SIGNED MESSAGE-----"));
    for form in [
        clear.clone(),
        inline(PAYLOAD, &alice, true),
        inline(PAYLOAD, &alice, false),
        base64::engine::general_purpose::STANDARD
            .encode(&clear)
            .into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(inline(PAYLOAD, &alice, false))
            .into_bytes(),
    ] {
        let s = verify(&form, &keys, now).unwrap();
        assert_eq!(s.payload, PAYLOAD.strip_suffix(b"\n").unwrap());
        assert_eq!(s.signers.len(), 1);
        assert_eq!(s.signers[0].fingerprint, alice.fingerprint().to_hex());
        assert_eq!(s.signers[0].user_id, "alice <alice@example.com>");
    }
}

#[test]
fn several_signers_count_separately() {
    let (alice, bob) = (key("alice"), key("bob"));
    let keys = ring(&[&alice, &bob]);
    let now = SystemTime::now();
    let both = sign_cleartext(PAYLOAD, &[alice.clone(), bob.clone()], now).unwrap();
    assert_eq!(verify(&both, &keys, now).unwrap().signers.len(), 2);
    // Two people's separate files, concatenated.
    let mut merged = sign_cleartext(PAYLOAD, std::slice::from_ref(&alice), now).unwrap();
    merged.extend(sign_cleartext(PAYLOAD, std::slice::from_ref(&bob), now).unwrap());
    assert_eq!(verify(&merged, &keys, now).unwrap().signers.len(), 2);
    // The same key twice is one signer.
    let mut twice = sign_cleartext(PAYLOAD, std::slice::from_ref(&alice), now).unwrap();
    twice.extend(sign_cleartext(PAYLOAD, std::slice::from_ref(&alice), now).unwrap());
    assert_eq!(verify(&twice, &keys, now).unwrap().signers.len(), 1);
    // Different payloads cannot be merged.
    let mut mixed = sign_cleartext(PAYLOAD, std::slice::from_ref(&alice), now).unwrap();
    mixed.extend(sign_cleartext(b"other\n", &[bob], now).unwrap());
    assert_eq!(verify(&mixed, &keys, now).unwrap_err().code(), "malformed");
}

#[test]
fn tampering_unknown_keys_and_garbage() {
    let (alice, mallory) = (key("alice"), key("mallory"));
    let keys = ring(&[&alice]);
    let now = SystemTime::now();
    let clear = sign_cleartext(PAYLOAD, std::slice::from_ref(&alice), now).unwrap();
    let tampered = String::from_utf8(clear.clone())
        .unwrap()
        .replacen("7d4c0a6e", "7d4c0a6f", 1);
    assert_eq!(
        verify(tampered.as_bytes(), &keys, now).unwrap_err().code(),
        "bad_signature"
    );
    let mut bin = inline(PAYLOAD, &alice, false);
    let last = bin.len() - 10;
    bin[last] ^= 0x01;
    let e = verify(&bin, &keys, now).unwrap_err();
    assert!(
        matches!(e.code().as_str(), "bad_signature" | "malformed"),
        "{e}"
    );
    // Only a key outside the keyring signed.
    let theirs = sign_cleartext(PAYLOAD, std::slice::from_ref(&mallory), now).unwrap();
    assert_eq!(
        verify(&theirs, &keys, now).unwrap_err().code(),
        "unknown_key"
    );
    // A key outside the keyring next to a good one is ignored.
    let both = sign_cleartext(PAYLOAD, &[alice.clone(), mallory], now).unwrap();
    assert_eq!(verify(&both, &keys, now).unwrap().signers.len(), 1);
    assert_eq!(
        verify(b"!!!not a token!!!", &keys, now).unwrap_err().code(),
        "malformed"
    );
    assert_eq!(
        verify(b"QUJDREVGRw==", &keys, now).unwrap_err().code(),
        "malformed"
    );
    let huge = vec![b'A'; 10 << 20];
    let started = std::time::Instant::now();
    assert_eq!(verify(&huge, &keys, now).unwrap_err().code(), "malformed");
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[test]
fn a_signers_clock_may_run_a_little_ahead() {
    let alice = key("alice");
    let keys = ring(&[&alice]);
    let now = SystemTime::now();
    let ahead = sign_cleartext(
        PAYLOAD,
        std::slice::from_ref(&alice),
        now + Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(verify(&ahead, &keys, now).unwrap().signers.len(), 1);
    let far_ahead = sign_cleartext(
        PAYLOAD,
        std::slice::from_ref(&alice),
        now + Duration::from_secs(3600),
    )
    .unwrap();
    assert_eq!(
        verify(&far_ahead, &keys, now).unwrap_err().code(),
        "bad_signature"
    );
}

#[test]
fn a_key_must_be_valid_now_not_only_when_it_signed() {
    let now = SystemTime::now();
    let long_ago = now - Duration::from_secs(30 * 24 * 3600);
    // Valid for one day, thirty days ago.
    let (expired, _) = CertBuilder::general_purpose(Some("old <old@example.com>"))
        .set_cipher_suite(CipherSuite::Cv25519)
        .set_creation_time(long_ago)
        .set_validity_period(Duration::from_secs(24 * 3600))
        .generate()
        .unwrap();
    let signed_then = sign_cleartext(
        PAYLOAD,
        std::slice::from_ref(&expired),
        long_ago + Duration::from_secs(60),
    )
    .unwrap();
    let keys = ring(&[&expired]);
    assert_eq!(
        verify(&signed_then, &keys, long_ago + Duration::from_secs(120))
            .unwrap()
            .signers
            .len(),
        1
    );
    assert_eq!(
        verify(&signed_then, &keys, now).unwrap_err().code(),
        "key_expired"
    );
    // Revoked after signing.
    let alice = key("alice");
    let signed = sign_cleartext(
        PAYLOAD,
        std::slice::from_ref(&alice),
        now - Duration::from_secs(60),
    )
    .unwrap();
    let mut signer = alice
        .primary_key()
        .key()
        .clone()
        .parts_into_secret()
        .unwrap()
        .into_keypair()
        .unwrap();
    let rev = alice
        .revoke(
            &mut signer,
            openpgp::types::ReasonForRevocation::KeyCompromised,
            b"lost",
        )
        .unwrap();
    let (revoked, _) = alice.insert_packets(rev).unwrap();
    let mut armored = Vec::new();
    revoked.armored().serialize(&mut armored).unwrap();
    let keys = Keyring {
        certs: vec![Cert::from_bytes(&armored).unwrap()],
    };
    assert_eq!(
        verify(&signed, &keys, now).unwrap_err().code(),
        "key_revoked"
    );
}

#[test]
fn a_protected_key_signs_only_with_its_passphrase() {
    use openpgp::cert::prelude::*;
    let now = SystemTime::now();
    let (cert, _) = CertBuilder::general_purpose(Some("Pat <pat@example.com>"))
        .set_cipher_suite(CipherSuite::Cv25519)
        .set_creation_time(now - Duration::from_secs(600))
        .set_password(Some("correct horse".into()))
        .generate()
        .unwrap();
    let keys = std::slice::from_ref(&cert);
    assert!(needs_passphrase(keys, now));
    let e = sign_cleartext(b"payload", keys, now).unwrap_err();
    assert!(e.contains("STEPGATE_PASSPHRASE"), "{e}");
    let e = sign_cleartext_with(b"payload", keys, now, Some("wrong")).unwrap_err();
    assert!(e.contains("wrong passphrase"), "{e}");
    let signed = sign_cleartext_with(b"payload", keys, now, Some("correct horse")).unwrap();
    let public = cert.clone().strip_secret_key_material();
    assert_eq!(
        verify(&signed, &ring(&[&public]), now).unwrap().payload,
        b"payload"
    );
    assert!(!needs_passphrase(&[key("open")], now));
}

#[test]
fn an_unsigned_payload_and_a_stray_keyring_file_say_what_they_are() {
    let e = verify(PAYLOAD, &Keyring::default(), SystemTime::now()).unwrap_err();
    assert!(e.to_string().contains("not signed"), "{e}");
    assert!(e.to_string().contains("gpg --clearsign"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README"), "these are our signers' keys\n").unwrap();
    let e = Keyring::load(dir.path()).unwrap_err();
    assert!(e.to_string().contains("not an OpenPGP key"), "{e}");
    assert!(e.to_string().contains("README"), "{e}");
}
