//! What one large Query costs stepgate in memory: the peak RSS (VmHWM) of a fresh `stepgate serve` process
//! while one client sends one Query of N MiB, over its RSS before, and its RSS once the query is done.
//!
//! Two statements per size, each in a fresh process: a read (`SELECT length('xx…')`, judged and forwarded;
//! held as `unparsed` above the 64 MiB parse budget)
//! and a guarded one (`COMMENT ON TABLE big IS 'xx…'`, ddl, held: the held entry and the log line keep its first
//! 64 KiB). The Query's own bytes are the floor: a process that holds the message once costs about N MiB.
//!
//! Run: `cargo bench --bench large_query` (env: BENCH_SIZES_MIB [1,16,256]; STEPGATE_BIN, another stepgate
//! binary to measure, e.g. an earlier build). A throwaway PostgreSQL is started and removed.

use std::process::{Command, Stdio};
use std::time::Duration;

use stepgate::devdb::{free_port, DevDb, DevDbOptions, SUPERUSER};

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES_MIB")
        .unwrap_or_else(|_| "1,16,256".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let db = DevDb::start(&DevDbOptions::default()).expect("PostgreSQL starts");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").user(SUPERUSER).dbname("postgres");
    rt.block_on(async {
        let mut direct = cfg.clone();
        direct.port(db.port());
        let (c, conn) = direct.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute("DROP TABLE IF EXISTS big; CREATE TABLE big (a text)")
            .await
            .unwrap();
    });
    for &mib in &sizes {
        let literal = "x".repeat(mib << 20);
        for (kind, sql) in [
            ("read", format!("SELECT length('{literal}')")),
            ("held", format!("COMMENT ON TABLE big IS '{literal}'")),
        ] {
            let state = tempfile::tempdir().unwrap();
            let port = free_port();
            let bin = std::env::var("STEPGATE_BIN")
                .unwrap_or_else(|_| env!("CARGO_BIN_EXE_stepgate").to_string());
            let mut child = Command::new(bin)
                .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--upstream", &db.addr()])
                .arg("--state-dir")
                .arg(state.path().join("state"))
                .env("RUST_LOG", "error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("stepgate serve starts");
            let pid = child.id();
            let (before, peak, after) = rt.block_on(async {
                let mut cfg = cfg.clone();
                cfg.port(port);
                let mut client = None;
                for _ in 0..100 {
                    if let Ok((c, conn)) = cfg.connect(tokio_postgres::NoTls).await {
                        tokio::spawn(conn);
                        client = Some(c);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let c = client.expect("stepgate answers");
                c.simple_query("select 1").await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
                let before = status_kib(pid, "VmRSS:");
                let r = c.simple_query(&sql).await;
                // Above stepgate's parse budget (64 MiB) even a read is held, as `unparsed`.
                let held =
                    |e: &tokio_postgres::Error| e.code().is_some_and(|c| c.code() == "42501");
                match (kind, &r) {
                    ("read", Ok(_)) => {}
                    ("read", Err(e)) if mib > 64 && held(e) => {}
                    ("held", Err(e)) if held(e) => {}
                    _ => panic!("{kind} {mib} MiB: {:?}", r.map(|_| ())),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                (before, status_kib(pid, "VmHWM:"), status_kib(pid, "VmRSS:"))
            });
            let _ = child.kill();
            let _ = child.wait();
            let grew = peak.saturating_sub(before) as f64 / 1024.0;
            let kept = after.saturating_sub(before) as f64 / 1024.0;
            println!(
                "{kind} {mib:>4} MiB Query: peak +{grew:.0} MiB ({:.2}× the query), {kept:.0} MiB still held after",
                grew / mib as f64
            );
            println!("BENCH {{\"scenario\":\"large-query\",\"kind\":\"{kind}\",\"mib\":{mib},\"rss_before_kib\":{before},\"peak_kib\":{peak},\"rss_after_kib\":{after}}}");
        }
    }
}
