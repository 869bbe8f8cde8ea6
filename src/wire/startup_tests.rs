//! Unit tests of `startup` (kept in their own file).

use super::*;

fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    StartupMessage {
        version: PROTOCOL_3_0,
        params: params
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect(),
    }
    .encode()
}

fn parsed(bytes: &[u8]) -> StartupMessage {
    match parse(bytes).unwrap().unwrap() {
        (StartupPacket::Startup(m), n) => {
            assert_eq!(n, bytes.len());
            m
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn round_trip() {
    let bytes = startup(&[("user", "alice"), ("database", "app")]);
    let m = parsed(&bytes);
    assert_eq!(m.get("user"), Some(&b"alice"[..]));
    assert_eq!(m.encode(), bytes);
}

#[test]
fn partial_and_bad_lengths() {
    let bytes = startup(&[("user", "a")]);
    assert_eq!(parse(&bytes[..bytes.len() - 1]), Ok(None));
    assert_eq!(parse(&[0, 0, 0]), Ok(None));
    assert_eq!(parse(&[0, 0, 0, 3]), Err(StartupError::BadLength(3)));
    assert_eq!(parse(&[0, 1, 0, 0]), Ok(None));
    assert_eq!(parse(&[0, 1, 0, 1]), Err(StartupError::TooLong(65537)));
    assert_eq!(
        parse(&[0xff, 0xff, 0xff, 0xff]),
        Err(StartupError::TooLong(u32::MAX))
    );
}

#[test]
fn requests() {
    let mut ssl = 8u32.to_be_bytes().to_vec();
    ssl.extend(SSL_REQUEST_CODE.to_be_bytes());
    assert_eq!(parse(&ssl).unwrap().unwrap().0, StartupPacket::Ssl);
    let mut cancel = 16u32.to_be_bytes().to_vec();
    cancel.extend(CANCEL_REQUEST_CODE.to_be_bytes());
    cancel.extend(42i32.to_be_bytes());
    cancel.extend(7i32.to_be_bytes());
    match parse(&cancel).unwrap().unwrap().0 {
        StartupPacket::Cancel { pid, key, raw } => {
            assert_eq!((pid, key), (42, 7));
            assert_eq!(&raw[..], &cancel[..]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let mut v = 12u32.to_be_bytes().to_vec();
    v.extend(PROTOCOL_3_0.to_be_bytes());
    v.extend(b"abcd"); // no terminator
    assert!(matches!(parse(&v), Err(StartupError::Malformed(_))));
    let mut v = 8u32.to_be_bytes().to_vec();
    v.extend(0x0002_0000u32.to_be_bytes());
    assert_eq!(parse(&v), Err(StartupError::UnsupportedProtocol(2, 0)));
}

#[test]
fn stepgate_settings_are_taken_out() {
    let mut m = parsed(&startup(&[
        ("user", "u"),
        ("Stepgate.Token", "direct"),
        (
            "options",
            "-c search_path=a\\ b -c stepgate.token=T1 -cstepgate.x=2 --stepgate.y=3 -c work_mem=64kB",
        ),
    ]));
    let taken = m.take_stepgate_settings().unwrap();
    assert_eq!(
        taken,
        vec![
            ("stepgate.token".into(), "direct".into()),
            ("stepgate.token".into(), "T1".into()),
            ("stepgate.x".into(), "2".into()),
            ("stepgate.y".into(), "3".into()),
        ]
    );
    assert_eq!(
        m.get("options"),
        Some(&b"-c search_path=a\\ b -c work_mem=64kB"[..])
    );
    assert!(m.get("Stepgate.Token").is_none());
}

#[test]
fn options_without_stepgate_are_forwarded_byte_for_byte() {
    let mut m = parsed(&startup(&[("options", "  -c   geqo=off  ")]));
    assert!(m.take_stepgate_settings().unwrap().is_empty());
    assert_eq!(m.get("options"), Some(&b"  -c   geqo=off  "[..]));
}

#[test]
fn options_that_only_held_stepgate_disappear() {
    let mut m = parsed(&startup(&[("options", "-c stepgate.token=abc")]));
    m.take_stepgate_settings().unwrap();
    assert!(m.get("options").is_none());
}

#[test]
fn a_value_that_merely_says_stepgate_is_fine() {
    let mut m = parsed(&startup(&[(
        "options",
        "-c application_name=stepgate-demo",
    )]));
    assert!(m.take_stepgate_settings().unwrap().is_empty());
}

#[test]
fn odd_forms_are_refused() {
    for odd in [
        "-c stepgate.token",
        "-c stepgate.token = x",
        "-Ec stepgate.token=x",
        "-cStepGate.token",
    ] {
        let mut m = parsed(&startup(&[("options", odd)]));
        assert!(
            matches!(
                m.take_stepgate_settings(),
                Err(StartupError::OddStepgateOption(_))
            ),
            "{odd}"
        );
    }
}

#[test]
fn repeated_parameters_read_as_postgresql_reads_them() {
    // PostgreSQL keeps the last value of a repeated parameter; so do stepgate and what it forwards.
    let bytes = startup(&[
        ("user", "dba"),
        ("database", "stepgate"),
        ("user", "app"),
        ("options", "-c stepgate.token=a"),
        ("application_name", "x"),
        ("options", "-c work_mem=1MB"),
    ]);
    let mut m = parsed(&bytes);
    assert_eq!(m.user(), "app");
    assert_eq!(m.database(), "stepgate");
    assert_eq!(m.get("options"), Some(&b"-c work_mem=1MB"[..]));
    assert_eq!(m.take_stepgate_settings().unwrap(), vec![]);
    let names: Vec<&[u8]> = m.params.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(
        names,
        vec![
            &b"database"[..],
            &b"user"[..],
            &b"application_name"[..],
            &b"options"[..]
        ]
    );
}

#[test]
fn database_defaults_to_the_user_name() {
    assert_eq!(parsed(&startup(&[("user", "app")])).database(), "app");
    assert_eq!(
        parsed(&startup(&[("user", "app"), ("database", "")])).database(),
        "app"
    );
}

#[test]
fn a_raw_clearsigned_token_in_options_is_refused_whole() {
    let raw =
        "-c stepgate.token=-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nstepgate-token: 1";
    let mut m = parsed(&startup(&[("user", "a"), ("options", raw)]));
    assert_eq!(m.take_stepgate_settings(), Err(StartupError::StrayOption));
    // Ordinary options next to a packed token still pass.
    let mut m = parsed(&startup(&[
        ("user", "a"),
        (
            "options",
            "-c work_mem=1MB -c stepgate.token=abc --search_path=x",
        ),
    ]));
    assert_eq!(
        m.take_stepgate_settings().unwrap(),
        vec![("stepgate.token".to_string(), "abc".to_string())]
    );
    assert_eq!(
        m.get("options"),
        Some(&b"-c work_mem=1MB --search_path=x"[..])
    );
}

/// PostgreSQL unescapes `options` before it reads a name: `-c st\epgate\.x=1` is `stepgate.x` to the server.
/// Such a spelling is taken (and so refused or used) like the plain one, never forwarded.
#[test]
fn escaped_stepgate_names_in_options_are_taken_not_forwarded() {
    for opts in [
        "-c stepgate\\.x=1",
        "-c s\\tepgate.x=1",
        "--s\\tepgate.x=1",
        "-cs\\tepgate.x=1",
        "-c st\\epgate\\.token=forged",
    ] {
        let mut m = parsed(&startup(&[("user", "u"), ("options", opts)]));
        let taken = m.take_stepgate_settings().unwrap();
        assert_eq!(taken.len(), 1, "{opts}");
        assert!(taken[0].0.starts_with("stepgate."), "{taken:?}");
        assert!(m.get("options").is_none(), "{:?}", m.get("options"));
    }
}
