//! Memory per idle session: RSS of a `stepgate serve` process before and after N client sessions (each
//! with its upstream connection) have logged in, run one query and gone idle.
//!
//! Run: `cargo bench --bench memory` (env: BENCH_SESSIONS [1000]). A throwaway PostgreSQL with room for the
//! sessions is started and removed.

use std::process::{Command, Stdio};
use std::time::Duration;

use stepgate::devdb::{free_port, DevDb, DevDbOptions, SUPERUSER};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let sessions: u64 = std::env::var("BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let db = DevDb::start(&DevDbOptions {
        extra_conf: vec![
            format!("max_connections = {}", sessions + 50),
            "shared_buffers = 64MB".into(),
        ],
        ..Default::default()
    })
    .expect("PostgreSQL starts");
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stepgate"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &db.addr()])
        .arg("--state-dir")
        .arg(state.path().join("state"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("stepgate serve starts");
    let pid = child.id();
    let _ = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=65536:65536"])
        .status();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Warm the process up with one session so the baseline includes the runtime's own allocations.
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1").port(port).user(SUPERUSER).dbname("postgres");
        let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.simple_query("select 1").await.unwrap();
        drop(c);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rss_kib(pid);
        let mut clients = Vec::new();
        for i in 0..sessions {
            let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap_or_else(|e| panic!("session {i}: {e}"));
            tokio::spawn(conn);
            c.simple_query("select 1").await.unwrap();
            clients.push(c);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_kib(pid);
        let per = (after.saturating_sub(before)) as f64 / sessions as f64;
        println!("stepgate RSS: {before} KiB with no session, {after} KiB with {sessions} idle sessions: {per:.1} KiB per session");
        println!("BENCH {{\"scenario\":\"idle-sessions\",\"sessions\":{sessions},\"rss_before_kib\":{before},\"rss_after_kib\":{after},\"kib_per_session\":{per:.2}}}");
        drop(clients);
    });
    let _ = child.kill();
    let _ = child.wait();
}
