//! TLS on both legs, against a PostgreSQL with ssl on: client TLS terminated by stepgate (psql
//! sslmode=require), upstream TLS, the SCRAM channel-binding matrix, and the CVE-2021-23214 class.

mod common;

use std::time::Duration;

use common::raw::{self, Raw};
use common::*;
use stepgate::config::{TlsConfig, UpstreamTls};
use stepgate::devdb::DevDbOptions;

fn certs() -> &'static (std::path::PathBuf, std::path::PathBuf) {
    static CERTS: std::sync::OnceLock<(
        tempfile::TempDir,
        (std::path::PathBuf, std::path::PathBuf),
    )> = std::sync::OnceLock::new();
    let (_, paths) = CERTS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_test_cert(dir.path());
        // A static is never dropped: a watchdog removes the key files once this test process is gone.
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {} 2>/dev/null; do sleep 0.5; done; rm -rf '{}'",
                std::process::id(),
                dir.path().display()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        (dir, paths)
    });
    paths
}

/// This binary's server has ssl on, so upstream TLS can be tested.
fn pg_ssl() -> &'static Pg {
    let (cert, key) = certs().clone();
    pg_with(DevDbOptions {
        ssl: Some((cert, key)),
        ..Default::default()
    })
}

async fn tls_gate(required: bool, upstream_tls: UpstreamTls) -> Gate {
    pg_ssl();
    let (cert, key) = certs().clone();
    gate_with(move |c| {
        c.tls = Some(TlsConfig {
            cert,
            key,
            required,
        });
        c.upstream_tls = upstream_tls;
    })
    .await
}

fn conninfo(g: &Gate, user: &str, sslmode: &str, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} dbname=postgres sslmode={sslmode} {extra}",
        g.addr.port()
    )
}

#[tokio::test]
async fn psql_with_sslmode_require_gets_tls_from_stepgate() {
    let g = tls_gate(false, UpstreamTls::Disable).await;
    let (ok, out, err) = tokio::task::spawn_blocking({
        let ci = conninfo(&g, "postgres", "require", "");
        move || psql(&ci, &["-c", "\\conninfo", "-c", "select 40 + 2"], &[])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("SSL connection (protocol: TLSv1."), "{out}");
    assert!(out.ends_with("42"), "{out}");
}

#[tokio::test]
async fn tls_required_refuses_plaintext_clients() {
    let g = tls_gate(true, UpstreamTls::Disable).await;
    let ci = conninfo(&g, "postgres", "disable", "");
    let (ok, _, err) = tokio::task::spawn_blocking(move || psql(&ci, &["-c", "select 1"], &[]))
        .await
        .unwrap();
    assert!(!ok);
    assert!(err.contains("stepgate: TLS is required"), "{err}");
    let ci = conninfo(&g, "postgres", "require", "");
    let (ok, out, err) = tokio::task::spawn_blocking(move || psql(&ci, &["-c", "select 1"], &[]))
        .await
        .unwrap();
    assert!(ok && out == "1", "{err}");
}

/// CVE-2021-23214 class: bytes that follow an SSLRequest before the handshake must not be processed.
#[tokio::test]
async fn plaintext_after_ssl_request_closes_the_connection() {
    for tls in [true, false] {
        let g = if tls {
            tls_gate(false, UpstreamTls::Disable).await
        } else {
            pg_ssl();
            gate().await
        };
        let mut r = Raw::connect(g.addr).await;
        let mut bytes = 8u32.to_be_bytes().to_vec();
        bytes.extend(80877103u32.to_be_bytes());
        bytes.extend(raw::startup_packet(&[
            ("user", b"postgres"),
            ("database", b"postgres"),
        ]));
        r.send(&bytes).await;
        // Nothing comes back: not 'S', not an authentication request. The connection is closed.
        assert_eq!(r.read_bytes(1).await, None, "tls={tls}");
        g.assert_healthy().await;
    }
}

/// A cancel connection may open with an SSLRequest (asyncpg does) before its CancelRequest.
#[tokio::test]
async fn cancel_request_after_ssl_request() {
    pg_ssl();
    let g = gate().await;
    let mut s = Raw::connect(g.addr).await;
    s.send(&raw::startup_packet(&[
        ("user", b"postgres"),
        ("database", b"postgres"),
    ]))
    .await;
    let msgs = s.until_ready().await;
    let key = msgs
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData")
        .1
        .clone();
    s.send(&raw::query(b"select pg_sleep(30)")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut c = Raw::connect(g.addr).await;
    let mut ssl = 8u32.to_be_bytes().to_vec();
    ssl.extend(80877103u32.to_be_bytes());
    c.send(&ssl).await;
    assert_eq!(c.read_bytes(1).await.as_deref(), Some(&b"N"[..]));
    let mut cancel = 16u32.to_be_bytes().to_vec();
    cancel.extend(80877102u32.to_be_bytes());
    cancel.extend(&key);
    c.send(&cancel).await;
    let started = std::time::Instant::now();
    let msgs = s.until_ready().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some("57014"), "{msgs:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// The matrix: client leg × upstream leg × libpq channel_binding, with a SCRAM user. Channel binding binds
/// SCRAM to the TLS session the client sees, which ends at stepgate, so it cannot work when both legs use TLS;
/// stepgate says so and `channel_binding=disable` works everywhere.
#[tokio::test]
async fn tls_matrix_with_scram_channel_binding() {
    let mut failures = Vec::new();
    for upstream in [UpstreamTls::Disable, UpstreamTls::Require] {
        let g = tls_gate(false, upstream).await;
        for sslmode in ["disable", "require"] {
            for cb in ["prefer", "disable"] {
                let ci = conninfo(&g, SCRAM_USER, sslmode, &format!("channel_binding={cb}"));
                let (ok, out, err) = tokio::task::spawn_blocking(move || {
                    psql(
                        &ci,
                        &[
                            "-c",
                            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
                        ],
                        &[("PGPASSWORD", SCRAM_PASSWORD)],
                    )
                })
                .await
                .unwrap();
                let both_tls = sslmode == "require" && upstream == UpstreamTls::Require;
                let expect_ok = !(both_tls && cb == "prefer");
                let case = format!(
                    "client sslmode={sslmode}, upstream_tls={upstream:?}, channel_binding={cb}"
                );
                if ok != expect_ok {
                    failures.push(format!("{case}: ok={ok} out={out} err={err}"));
                    continue;
                }
                if ok {
                    let want = if upstream == UpstreamTls::Require {
                        "t"
                    } else {
                        "f"
                    };
                    if out != want {
                        failures.push(format!("{case}: upstream ssl {out}, expected {want}"));
                    }
                } else if !err.contains("channel_binding=disable") {
                    failures.push(format!("{case}: refusal does not say what to do: {err}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test]
async fn upstream_tls_require_fails_clearly_without_server_tls() {
    // A server without TLS (a scripted peer that answers the SSLRequest with 'N').
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let mut b = [0u8; 8];
            let _ = s.read_exact(&mut b).await;
            let _ = s.write_all(b"N").await;
        }
    });
    let g = gate_with(|c| {
        c.upstream = addr.to_string();
        c.upstream_tls = UpstreamTls::Require;
    })
    .await;
    let e = connect_err(g.config("postgres", "postgres")).await;
    assert_eq!(sqlstate(&e).as_deref(), Some("08006"));
    assert!(e
        .as_db_error()
        .unwrap()
        .message()
        .contains("does not offer TLS"));
}
