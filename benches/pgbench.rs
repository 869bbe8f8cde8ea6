//! End-to-end: pgbench straight to PostgreSQL, through stepgate (enforce mode, every session holding a
//! verified token from PGOPTIONS), through the same proxy with the gate switched off (`--unsafe-no-gate`),
//! and through pgbouncer (session mode; installed with apt-get when missing, where the system has it), in
//! one run with the order of the targets rotating every round, reported as the median ratio to direct with
//! the spread.
//!
//! Per target: the median of per-round ratios to direct (with the spread), the median of the latency each
//! round added to direct's in the same round (µs per round trip), and for the proxies the CPU time (user +
//! system, from `/proc/<pid>/stat`) their process spent per transaction.
//!
//! Scenarios: `select-only-simple` (`-S -c 8`, simple protocol: every transaction a different literal),
//! `select-only-prepared` (`-S -c 8 -M prepared`), `latency-c1` (`-S -c 1`: added µs per round trip) and
//! `tpcb` (the default TPC-B-like script, `-c 8`: writes).
//!
//! The proxies are the real programs, started afresh every round (`stepgate serve`, as built with this bench,
//! logging to a file as it does in production; pgbouncer), so that no target keeps a lucky or unlucky thread
//! placement for a whole run.
//!
//! Run: `cargo bench --bench pgbench` (env: BENCH_ROUNDS [7], BENCH_SECONDS [5], BENCH_CLIENTS [8],
//! BENCH_SCENARIOS [all, comma-separated], BENCH_NO_PGBOUNCER to leave pgbouncer out, BENCH_WORKERS=N passed
//! as `stepgate serve --workers N` [default: one per two CPUs; 0 runs sessions as async tasks on the main
//! runtime], BENCH_HOLD to start the targets once, print their addresses and wait for Enter, for profiling).
//! Everything is local (127.0.0.1); a throwaway PostgreSQL is started and removed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stepgate::devdb::{free_port, DevDb, DevDbOptions, SUPERUSER};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One pgbench run.
struct Run {
    tps: f64,
    /// Average latency, ms.
    latency: f64,
    transactions: f64,
    /// CPU time (user + system) the target's proxy process spent during the run, µs (None for direct).
    cpu_us: Option<f64>,
}

/// User + system CPU time of a process and all its threads so far, µs (`/proc/<pid>/stat`, in USER_HZ
/// ticks of 10 ms).
fn cpu_us(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) start at the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 10_000.0)
}

fn run(
    port: u16,
    pid: Option<u32>,
    args: &[&str],
    clients: u64,
    seconds: u64,
    options: Option<&str>,
) -> Run {
    let cpu_before = pid.and_then(cpu_us);
    let mut cmd = Command::new("pgbench");
    cmd.args(["-n", "-h", "127.0.0.1", "-U", SUPERUSER])
        .args(args)
        .args([
            "-p",
            &port.to_string(),
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
        ])
        .args(["-T", &seconds.to_string(), "bench"])
        .env_remove("PGOPTIONS")
        .stdin(Stdio::null());
    if let Some(o) = options {
        cmd.env("PGOPTIONS", o);
    }
    let out = cmd.output().expect("pgbench runs");
    let cpu_after = pid.and_then(cpu_us);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    let number = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} line: {text}"))
    };
    Run {
        tps: number("tps = "),
        latency: number("latency average = "),
        transactions: number("number of transactions actually processed: "),
        cpu_us: cpu_before.zip(cpu_after).map(|(b, a)| a - b),
    }
}

/// A token for database `bench` signed by the test key alice (fixtures/keys), as `stepgate token pack` prints
/// it, and the configuration that trusts it (written to `config`): every stepgate session of the benchmark
/// holds a verified token.
fn token_policy(config: &Path) -> String {
    use sequoia_openpgp::parse::Parse;
    let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/keys");
    let fingerprint = std::fs::read_to_string(keys.join("fingerprints.txt"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("alice ").map(str::to_string))
        .unwrap();
    std::fs::write(
        config,
        format!(
            "keyring = {:?}\n\n[[signer]]\nname = \"alice\"\nfingerprint = \"{fingerprint}\"\n",
            keys.join("keyring").display().to_string()
        ),
    )
    .unwrap();
    let sql = "DROP TABLE pgbench_history";
    let payload = stepgate::token::Payload {
        id: stepgate::token::new_uuid(),
        instance: None,
        database: "bench".into(),
        user: None,
        not_before: None,
        not_after: std::time::SystemTime::now() + Duration::from_secs(3000),
        statements: vec![stepgate::token::StatementGrant {
            fingerprint: stepgate::token::payload::fingerprint_of(sql).unwrap(),
            class: stepgate::classify::Class::Destructive,
            sql: sql.into(),
        }],
        reason: Some("benchmark".into()),
    };
    let alice = sequoia_openpgp::Cert::from_file(keys.join("alice.sec.asc")).unwrap();
    let signed = stepgate::token::signed::sign_cleartext(
        payload.render().as_bytes(),
        &[alice],
        std::time::SystemTime::now(),
    )
    .unwrap();
    format!("-c stepgate.token={}", stepgate::token::pack(&signed))
}

const PGBOUNCER_PATHS: [&str; 2] = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"];

/// The pgbouncer binary; when missing and the system has apt-get and we are root, installs the package first.
fn pgbouncer_binary() -> Option<&'static str> {
    let find = || {
        PGBOUNCER_PATHS
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
    };
    if let Some(bin) = find() {
        return Some(bin);
    }
    if !stepgate::devdb::is_root() || !std::path::Path::new("/usr/bin/apt-get").exists() {
        return None;
    }
    eprintln!("pgbouncer is not installed: apt-get install pgbouncer");
    let installed = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "pgbouncer",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!("apt-get install pgbouncer failed");
    }
    find()
}

/// Waits until something accepts connections on the port; false after 15 s.
fn wait_listening(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `stepgate serve` (gate on, or off with `--unsafe-no-gate`) as its own process, logging to a file in `dir`.
fn start_stepgate(db: &DevDb, config: &Path, dir: &Path, gate: bool) -> (Child, u16) {
    let port = free_port();
    let log = std::fs::File::create(dir.join("stepgate.log")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stepgate"));
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &db.addr()])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if !gate {
        cmd.arg("--unsafe-no-gate");
    }
    if let Ok(n) = std::env::var("BENCH_WORKERS") {
        cmd.args(["--workers", &n]);
    }
    let mut child = cmd.spawn().expect("stepgate serve starts");
    if !wait_listening(port) {
        let _ = child.kill();
        panic!(
            "stepgate serve did not start: {}",
            std::fs::read_to_string(dir.join("stepgate.log")).unwrap_or_default()
        );
    }
    (child, port)
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn start_pgbouncer(db: &DevDb, dir: &std::path::Path) -> Option<(Child, u16)> {
    let bin = pgbouncer_binary()?;
    let port = free_port();
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(dir.join("userlist.txt"), format!("\"{SUPERUSER}\" \"\"\n")).ok()?;
    std::fs::write(
        &ini,
        format!(
            "[databases]\nbench = host=127.0.0.1 port={} dbname=bench\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {port}\nauth_type = trust\nauth_file = {}\npool_mode = session\n\
             max_client_conn = 200\ndefault_pool_size = 50\nunix_socket_dir =\nlogfile = {}\n",
            db.port(),
            dir.join("userlist.txt").display(),
            dir.join("pgbouncer.log").display()
        ),
    )
    .ok()?;
    let _ = Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(dir)
        .status();
    let mut cmd = Command::new(bin);
    if stepgate::devdb::is_root() {
        cmd.args(["-u", "postgres"]);
    }
    let mut child = cmd
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    if !wait_listening(port) {
        stop(&mut child);
        return None;
    }
    Some((child, port))
}

/// (median, min, max) of one target's per-round values.
fn summary(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful either: run only when asked.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds = env_num("BENCH_ROUNDS", 7);
    let seconds = env_num("BENCH_SECONDS", 5);
    let clients = env_num("BENCH_CLIENTS", 8);
    let db = DevDb::start(&DevDbOptions::default()).expect("PostgreSQL starts");
    db.psql("CREATE DATABASE bench").unwrap();
    let init = Command::new("pgbench")
        .args([
            "-i",
            "-q",
            "-s",
            "10",
            "-h",
            "127.0.0.1",
            "-U",
            SUPERUSER,
            "-p",
            &db.port().to_string(),
            "bench",
        ])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stepgate.toml");
    let token_options = token_policy(&config);
    let pgbouncer =
        std::env::var_os("BENCH_NO_PGBOUNCER").is_none() && pgbouncer_binary().is_some();
    if !pgbouncer {
        eprintln!("pgbouncer not installed or left out (BENCH_NO_PGBOUNCER): comparing direct and stepgate only");
    }
    let targets = Targets {
        db: &db,
        config: &config,
        dir: dir.path(),
        pgbouncer,
    };

    if std::env::var_os("BENCH_HOLD").is_some() {
        // For profiling: the targets stay up until Enter.
        let up = targets.start();
        for (name, port, _) in up.ports() {
            println!("{name} 127.0.0.1:{port}");
        }
        println!("PGOPTIONS='{token_options}'");
        println!("bench pid {}; press Enter to stop", std::process::id());
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        drop(up);
    } else {
        run_scenarios(&targets, &token_options, rounds, seconds, clients);
    }
}

/// What every round starts afresh.
struct Targets<'a> {
    db: &'a DevDb,
    config: &'a Path,
    dir: &'a Path,
    pgbouncer: bool,
}

/// The targets of one round: name, port and, for a proxy, its process (killed when the round is dropped).
struct Up(Vec<(&'static str, u16, Option<Child>)>);

impl Targets<'_> {
    /// The targets in the order every round starts and reports them.
    fn names(&self) -> Vec<&'static str> {
        let mut names = vec!["direct", "stepgate", "stepgate-nogate"];
        if self.pgbouncer {
            names.push("pgbouncer");
        }
        names
    }

    fn start(&self) -> Up {
        Up(self
            .names()
            .into_iter()
            .map(|name| {
                if name == "direct" {
                    return (name, self.db.port(), None);
                }
                let dir = self.dir.join(name);
                std::fs::create_dir_all(&dir).unwrap();
                let (child, port) = match name {
                    "pgbouncer" => start_pgbouncer(self.db, &dir).expect("pgbouncer starts"),
                    _ => start_stepgate(self.db, self.config, &dir, name == "stepgate"),
                };
                (name, port, Some(child))
            })
            .collect())
    }
}

impl Up {
    /// Name, port and the proxy's process id, per target.
    fn ports(&self) -> Vec<(&'static str, u16, Option<u32>)> {
        self.0
            .iter()
            .map(|(name, port, child)| (*name, *port, child.as_ref().map(Child::id)))
            .collect()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        for child in self.0.iter_mut().filter_map(|(_, _, c)| c.as_mut()) {
            stop(child);
        }
    }
}

/// Every scenario, round by round, with the target order rotating; prints the tables and BENCH lines.
fn run_scenarios(
    targets: &Targets<'_>,
    token_options: &str,
    rounds: u64,
    seconds: u64,
    clients: u64,
) {
    println!("{seconds} s per run, {rounds} rounds, target order rotating each round, proxies started afresh each round; stepgate sessions hold a verified token");
    let names = targets.names();
    let scenarios: Vec<(&str, Vec<&str>, u64)> = vec![
        ("select-only-simple", vec!["-S", "-M", "simple"], clients),
        (
            "select-only-prepared",
            vec!["-S", "-M", "prepared"],
            clients,
        ),
        ("latency-c1", vec!["-S", "-M", "simple"], 1),
        ("tpcb", vec!["-M", "simple"], clients),
    ];
    let wanted = std::env::var("BENCH_SCENARIOS").unwrap_or_default();
    for (scenario, args, clients) in scenarios {
        if !wanted.is_empty() && !wanted.split(',').any(|w| w == scenario) {
            continue;
        }
        println!("{scenario}: pgbench {} -c {clients}", args.join(" "));
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
        let mut tps_all: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
        // Latency added per round trip, µs, against direct in the same round; proxy CPU per transaction.
        let mut added_all: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
        let mut cpu_all: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
        let mut lat_all: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
        for round in 0..rounds {
            let up = targets.start();
            let ports = up.ports();
            // The order rotates every round, so no target always runs first or right after another.
            let n = ports.len();
            let mut got: Vec<Option<Run>> = (0..n).map(|_| None).collect();
            for k in 0..n {
                let i = (k + round as usize) % n;
                let (name, port, pid) = ports[i];
                let options = name.starts_with("stepgate").then_some(token_options);
                got[i] = Some(run(port, pid, &args, clients, seconds, options));
            }
            drop(up);
            let got: Vec<Run> = got
                .into_iter()
                .map(|r| r.expect("every target ran"))
                .collect();
            let (direct, direct_latency) = (got[0].tps, got[0].latency);
            let mut line = format!("  round {}:", round + 1);
            for (i, name) in names.iter().enumerate() {
                let r = &got[i];
                let t = r.tps;
                ratios[i].push(t / direct);
                tps_all[i].push(t);
                lat_all[i].push(r.latency);
                added_all[i].push((r.latency - direct_latency) * 1000.0);
                line.push_str(&format!("  {name} {t:.0} tps ({:.3})", t / direct));
                if let Some(cpu) = r.cpu_us {
                    let per_txn = cpu / r.transactions.max(1.0);
                    cpu_all[i].push(per_txn);
                    line.push_str(&format!(" {per_txn:.1} µs cpu"));
                }
            }
            println!("{line}");
        }
        // The gate's own cost: stepgate with the gate on versus the same proxy with it off, round by round.
        let gate_cost: Vec<f64> = tps_all[1]
            .iter()
            .zip(&tps_all[2])
            .map(|(on, off)| on / off)
            .collect();
        let (m, lo, hi) = summary(&gate_cost);
        println!("  gate on / gate off: median {m:.3} (spread {lo:.3}..{hi:.3})");
        println!("BENCH {{\"scenario\":\"{scenario}\",\"target\":\"gate-on/gate-off\",\"ratio\":{m:.4},\"min_ratio\":{lo:.4},\"max_ratio\":{hi:.4}}}");
        // stepgate against pgbouncer directly, round by round (direct's own swings cancel out).
        if let Some(b) = names.iter().position(|n| *n == "pgbouncer") {
            let head_to_head: Vec<f64> = tps_all[1]
                .iter()
                .zip(&tps_all[b])
                .map(|(s, p)| s / p)
                .collect();
            let (m, lo, hi) = summary(&head_to_head);
            let wins = head_to_head.iter().filter(|r| **r >= 1.0).count();
            println!("  stepgate / pgbouncer: median {m:.3} (spread {lo:.3}..{hi:.3}), stepgate ahead in {wins} of {} rounds", head_to_head.len());
            println!("BENCH {{\"scenario\":\"{scenario}\",\"target\":\"stepgate/pgbouncer\",\"ratio\":{m:.4},\"min_ratio\":{lo:.4},\"max_ratio\":{hi:.4},\"rounds_ahead\":{wins}}}");
        }
        for (i, name) in names.iter().enumerate() {
            let (m, lo, hi) = summary(&ratios[i]);
            let mt = summary(&tps_all[i]).0;
            let lat = summary(&lat_all[i]).0;
            let added_us = summary(&added_all[i]).0;
            let (cpu_text, cpu_json) = if cpu_all[i].is_empty() {
                (String::new(), String::new())
            } else {
                let (c, clo, chi) = summary(&cpu_all[i]);
                (
                    format!("  proxy cpu {c:.1} µs/txn ({clo:.1}..{chi:.1})"),
                    format!(",\"cpu_us_per_txn\":{c:.2}"),
                )
            };
            println!("  {name:16} median {mt:8.0} tps  ratio to direct {m:.3}  (spread {lo:.3}..{hi:.3})  latency {lat:.3} ms ({added_us:+.0} µs){cpu_text}");
            println!("BENCH {{\"scenario\":\"{scenario}\",\"target\":\"{name}\",\"median_tps\":{mt:.0},\"ratio\":{m:.4},\"min_ratio\":{lo:.4},\"max_ratio\":{hi:.4},\"latency_ms\":{lat:.4},\"added_us\":{added_us:.1}{cpu_json}}}");
        }
    }
}
