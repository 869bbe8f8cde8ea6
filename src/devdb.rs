//! A throwaway PostgreSQL server in a temporary directory, for `stepgate demo` and the integration tests.
//!
//! It runs `initdb` and `postgres` from PATH (falling back to `/usr/lib/postgresql/<version>/bin`), on a
//! free port on 127.0.0.1, with its socket and data in a fresh temp directory. Run as root, the server runs
//! as the `postgres` user. Two login roles besides the trusted superuser `postgres` exist so authentication
//! can be exercised: [`SCRAM_USER`] (scram-sha-256), [`MD5_USER`] (md5) and [`CLEARTEXT_USER`] (password). A watchdog process stops the
//! server and removes the directory when the process that started it exits, even by SIGKILL; dropping the
//! [`DevDb`] does the same at once.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

pub const SUPERUSER: &str = "postgres";
pub const SCRAM_USER: &str = "scram_user";
pub const SCRAM_PASSWORD: &str = "scram-secret";
pub const MD5_USER: &str = "md5_user";
pub const MD5_PASSWORD: &str = "md5-secret";
pub const CLEARTEXT_USER: &str = "cleartext_user";
pub const CLEARTEXT_PASSWORD: &str = "cleartext-secret";

#[derive(Debug, Error)]
pub enum DevDbError {
    #[error("{0} not found on PATH or in /usr/lib/postgresql/*/bin: install the PostgreSQL server (apt-get install postgresql), or set DATABASE_URL for the tests")]
    Missing(&'static str),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed:\n{output}")]
    Failed { what: String, output: String },
    #[error("the `postgres` user does not exist; running PostgreSQL as root is not possible")]
    NoPostgresUser,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevDbError {
    let what = what.into();
    move |source| DevDbError::Io { what, source }
}

/// Extra settings for the server.
#[derive(Debug, Clone, Default)]
pub struct DevDbOptions {
    /// PEM certificate and key: turns on `ssl`.
    pub ssl: Option<(PathBuf, PathBuf)>,
    /// Lines appended to postgresql.conf (e.g. `log_statement = 'all'`).
    pub extra_conf: Vec<String>,
}

/// A running throwaway server. Dropping it stops the server and removes its directory.
pub struct DevDb {
    root: PathBuf,
    port: u16,
    server: Option<Child>,
    watchdog: Option<Child>,
    bin_dir: PathBuf,
}

fn find_bin_dir() -> Result<PathBuf, DevDbError> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut candidates: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    candidates.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().ok_or(DevDbError::Missing("initdb"))
}

/// True when this process runs as root (then servers are started as the `postgres` user).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// uid and gid of the `postgres` user when running as root; None otherwise.
fn run_as() -> Result<Option<(u32, u32)>, DevDbError> {
    if !is_root() {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").map_err(io("reading /etc/passwd"))?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            if let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) {
                return Ok(Some((uid, gid)));
            }
        }
    }
    Err(DevDbError::NoPostgresUser)
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn command(bin: &Path, user: Option<(u32, u32)>) -> Command {
    let mut c = Command::new(bin);
    if let Some((uid, gid)) = user {
        c.uid(uid).gid(gid);
    }
    c.env_remove("PGDATA").env("LC_ALL", "C");
    c
}

fn run(mut c: Command, what: &str) -> Result<String, DevDbError> {
    let out = c.output().map_err(io(what.to_string()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(DevDbError::Failed {
            what: what.to_string(),
            output: text,
        })
    }
}

impl DevDb {
    /// initdb, configure, start, and wait until the server accepts connections.
    pub fn start(opts: &DevDbOptions) -> Result<DevDb, DevDbError> {
        let bin_dir = find_bin_dir()?;
        let user = run_as()?;
        let root = std::env::temp_dir().join(format!(
            "stepgate-pg-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(io("chmod"))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid)).map_err(io("chown"))?;
        }
        let data = root.join("data");
        let mut db = DevDb {
            root: root.clone(),
            port: 0,
            server: None,
            watchdog: None,
            bin_dir: bin_dir.clone(),
        };
        let mut initdb = command(&bin_dir.join("initdb"), user);
        initdb.arg("-D").arg(&data).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(initdb, "initdb")?;
        let hba = format!(
            "local all all trust\n\
             host all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n\
             host all {MD5_USER} 127.0.0.1/32 md5\n\
             host all {CLEARTEXT_USER} 127.0.0.1/32 password\n\
             host all all 127.0.0.1/32 trust\n\
             host all all ::1/128 trust\n"
        );
        fs::write(data.join("pg_hba.conf"), hba).map_err(io("writing pg_hba.conf"))?;
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", root.display()),
            "fsync = off".into(),
            "synchronous_commit = off".into(),
            "full_page_writes = off".into(),
            "max_connections = 300".into(),
            "shared_buffers = 64MB".into(),
            "logging_collector = off".into(),
        ];
        if let Some((cert, key)) = &opts.ssl {
            for (src, name) in [(cert, "server.crt"), (key, "server.key")] {
                let dst = data.join(name);
                fs::copy(src, &dst).map_err(io(format!("copying {}", src.display())))?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(0o600))
                    .map_err(io("chmod"))?;
                if let Some((uid, gid)) = user {
                    std::os::unix::fs::chown(&dst, Some(uid), Some(gid)).map_err(io("chown"))?;
                }
            }
            conf.push("ssl = on".into());
        }
        conf.extend(opts.extra_conf.iter().cloned());
        let mut text =
            fs::read_to_string(data.join("postgresql.conf")).map_err(io("postgresql.conf"))?;
        text.push('\n');
        text.push_str(&conf.join("\n"));
        text.push('\n');
        fs::write(data.join("postgresql.conf"), text).map_err(io("writing postgresql.conf"))?;

        let mut last_err = None;
        for _ in 0..3 {
            let port = free_port();
            match db.launch(&data, port, user) {
                Ok(()) => {
                    db.port = port;
                    db.setup_roles()?;
                    return Ok(db);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(DevDbError::Missing("postgres")))
    }

    fn launch(
        &mut self,
        data: &Path,
        port: u16,
        user: Option<(u32, u32)>,
    ) -> Result<(), DevDbError> {
        let log_path = self.log_path();
        let log = fs::File::create(&log_path).map_err(io("creating the server log"))?;
        if let Some((uid, gid)) = user {
            let _ = std::os::unix::fs::chown(&log_path, Some(uid), Some(gid));
        }
        let log2 = log.try_clone().map_err(io("server log"))?;
        let mut server = command(&self.bin_dir.join("postgres"), user);
        server
            .arg("-D")
            .arg(data)
            .arg("-p")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        let child = server.spawn().map_err(io("starting postgres"))?;
        let pid = child.id();
        self.server = Some(child);
        self.port = port;
        // The watchdog outlives us: when this process is gone, it stops the server and removes the files.
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 0.5; done; \
             kill -INT {pid} 2>/dev/null; i=0; \
             while kill -0 {pid} 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
             kill -KILL {pid} 2>/dev/null; rm -rf '{root}'",
            parent = std::process::id(),
            root = self.root.display()
        );
        self.watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok();
        let started = Instant::now();
        loop {
            if let Some(child) = self.server.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.server = None;
                    if let Some(mut w) = self.watchdog.take() {
                        let _ = w.kill();
                        let _ = w.wait();
                    }
                    return Err(DevDbError::Failed {
                        what: format!("postgres exited with {status}"),
                        output: fs::read_to_string(&log_path).unwrap_or_default(),
                    });
                }
            }
            if self.psql("select 1").is_ok() {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(DevDbError::Failed {
                    what: "waiting for postgres to accept connections".into(),
                    output: fs::read_to_string(&log_path).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn setup_roles(&self) -> Result<(), DevDbError> {
        self.psql(&format!(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}'; \
             SET password_encryption = 'md5'; \
             CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}'; \
             CREATE ROLE {CLEARTEXT_USER} LOGIN PASSWORD '{CLEARTEXT_PASSWORD}'; \
             GRANT ALL ON SCHEMA public TO {SCRAM_USER}, {MD5_USER}, {CLEARTEXT_USER};"
        ))?;
        Ok(())
    }

    /// Runs SQL as the superuser over the Unix socket (never through stepgate) and returns psql's
    /// unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String, DevDbError> {
        self.psql_in("postgres", sql)
    }

    /// [`DevDb::psql`] in database `db`.
    pub fn psql_in(&self, db: &str, sql: &str) -> Result<String, DevDbError> {
        let mut c = Command::new("psql");
        c.arg("-h")
            .arg(&self.root)
            .arg("-p")
            .arg(self.port.to_string())
            .args([
                "-U",
                SUPERUSER,
                "-d",
                db,
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .env_remove("PGOPTIONS")
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null());
        run(c, &format!("psql -c {sql:?}"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// `127.0.0.1:<port>`, the address to give stepgate as its upstream.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The Unix-socket directory (a direct, local connection that bypasses TCP).
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The server's log file (stdout and stderr of postgres).
    pub fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// The directory with the server binaries used (also has pgbench, pg_ctl …).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Stops the server and removes its directory.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

impl Drop for DevDb {
    fn drop(&mut self) {
        self.stop();
    }
}
