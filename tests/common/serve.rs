//! `stepgate serve` as a process, as a person runs it; its log lines are kept for the test to read.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::pg;

pub const BIN: &str = env!("CARGO_BIN_EXE_stepgate");

/// A `stepgate serve` process; killed when dropped.
pub struct Serve {
    pub child: Child,
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Serve {
    /// `serve --listen <free port> --upstream <pg> --state-dir <temp>` plus `extra`.
    pub fn start(extra: &[&str]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let port = stepgate::devdb::free_port();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--upstream".into(),
            pg().addr(),
            "--state-dir".into(),
            dir.path().join("state").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(args, port, dir, &[])
    }

    /// `serve` with exactly these arguments (which must make it listen on `port`) and environment.
    pub fn spawn(
        args: Vec<String>,
        port: u16,
        dir: tempfile::TempDir,
        env: &[(&str, &str)],
    ) -> Serve {
        let mut cmd = Command::new(BIN);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        // Wait for the "accepting connections" line, keep draining stderr afterwards.
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let started = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) if line.contains("accepting connections") => break,
                Ok(_) => {}
                Err(e) => panic!(
                    "stepgate serve did not start: {e}: {:?}",
                    lines.lock().unwrap()
                ),
            }
            assert!(started.elapsed() < Duration::from_secs(20));
        }
        Serve {
            child,
            port,
            lines,
            _dir: dir,
        }
    }

    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={} dbname={db} sslmode=disable",
            self.port,
            pg().user
        )
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
