//! Shared integration-test harness: one throwaway PostgreSQL per test binary (or `DATABASE_URL`), and a
//! stepgate server per test on a free port.
#![allow(dead_code)]

pub mod gnupg;
pub mod raw;
pub mod serve;
pub mod tokens;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::OnceLock;

use stepgate::config::Config;
use stepgate::devdb::{DevDb, DevDbOptions};
use stepgate::proxy::Server;
use tokio_util::sync::CancellationToken;

#[allow(unused_imports)]
pub use stepgate::devdb::{
    CLEARTEXT_PASSWORD, CLEARTEXT_USER, MD5_PASSWORD, MD5_USER, SCRAM_PASSWORD, SCRAM_USER,
    SUPERUSER,
};

/// The PostgreSQL server of this test binary.
pub struct Pg {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    devdb: Option<DevDb>,
}

static PG: OnceLock<Pg> = OnceLock::new();

/// The shared server: from `DATABASE_URL` when set, else a throwaway one started on first use.
pub fn pg() -> &'static Pg {
    pg_with(DevDbOptions::default())
}

/// Like [`pg`], with server options (used by a test binary that needs, say, ssl on). The first call in a
/// binary decides.
pub fn pg_with(opts: DevDbOptions) -> &'static Pg {
    PG.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            let cfg =
                tokio_postgres::Config::from_str(&url).expect("DATABASE_URL is a postgres URL");
            let host = match cfg.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                _ => "127.0.0.1".to_string(),
            };
            return Pg {
                host,
                port: cfg.get_ports().first().copied().unwrap_or(5432),
                user: cfg.get_user().unwrap_or("postgres").to_string(),
                password: cfg
                    .get_password()
                    .map(|p| String::from_utf8_lossy(p).into_owned()),
                dbname: cfg.get_dbname().unwrap_or("postgres").to_string(),
                devdb: None,
            };
        }
        let db = DevDb::start(&opts).unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
        Pg {
            host: db.host().to_string(),
            port: db.port(),
            user: SUPERUSER.to_string(),
            password: None,
            dbname: "postgres".to_string(),
            devdb: Some(db),
        }
    })
}

impl Pg {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn devdb(&self) -> Option<&DevDb> {
        self.devdb.as_ref()
    }

    /// A direct connection (bypassing stepgate) as the superuser: for setting up tables and checking rows.
    pub async fn direct(&self) -> tokio_postgres::Client {
        self.direct_to(&self.dbname).await
    }

    /// A direct connection as the superuser to database `db`.
    pub async fn direct_to(&self, db: &str) -> tokio_postgres::Client {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(db);
        if let Some(p) = &self.password {
            cfg.password(p);
        }
        connect(cfg).await.expect("direct connection to PostgreSQL")
    }

    /// A fresh database for one test, created directly on the server.
    pub async fn create_db(&self, name: &str) {
        let c = self.direct().await;
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .await
            .unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    }
}

/// Connects with tokio-postgres and drives the connection on the current runtime.
pub async fn connect(
    cfg: tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The error of a connection attempt that must fail.
pub async fn connect_err(cfg: tokio_postgres::Config) -> tokio_postgres::Error {
    match connect(cfg).await {
        Ok(_) => panic!("the connection was expected to fail"),
        Err(e) => e,
    }
}

/// A stepgate server running in this test's runtime; stops when dropped.
pub struct Gate {
    pub addr: SocketAddr,
    pub config: Config,
    handle: Option<stepgate::proxy::ServerHandle>,
    /// Where `/metrics` is served, when the config sets `metrics_listen`.
    pub metrics_addr: Option<SocketAddr>,
    options: stepgate::proxy::ServeOptions,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    _state: tempfile::TempDir,
}

/// Starts stepgate in front of [`pg`] with the defaults, after `tweak` has adjusted the config.
pub async fn gate_with(tweak: impl FnOnce(&mut Config)) -> Gate {
    gate_with_options(tweak, Default::default()).await
}

/// Both relays: the epoll relay (the default) and the async relay (`--workers 0`).
pub fn relays() -> [stepgate::proxy::ServeOptions; 2] {
    [
        stepgate::proxy::ServeOptions::default(),
        stepgate::proxy::ServeOptions {
            workers: Some(0),
            ..Default::default()
        },
    ]
}

/// Like [`gate_with`], with server options (e.g. `workers: Some(0)` for the async relay).
pub async fn gate_with_options(
    tweak: impl FnOnce(&mut Config),
    options: stepgate::proxy::ServeOptions,
) -> Gate {
    let state = tempfile::tempdir().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".into(),
        upstream: pg().addr(),
        state_dir: state.path().join("state"),
        ..Config::default()
    };
    tweak(&mut config);
    launch(config, options, state).await
}

/// Starts stepgate from a config file (its `listen` and `upstream` replaced by a free port and [`pg`]),
/// so that a reload through [`Gate::handle`] re-reads that file.
pub async fn gate_from_file(path: &std::path::Path) -> Gate {
    gate_from_file_with(path, Default::default()).await
}

/// [`gate_from_file`] with server options (e.g. `workers: Some(0)` for the async relay).
pub async fn gate_from_file_with(
    path: &std::path::Path,
    options: stepgate::proxy::ServeOptions,
) -> Gate {
    let overrides = stepgate::config::Overrides {
        listen: Some("127.0.0.1:0".into()),
        upstream: Some(pg().addr()),
        ..Default::default()
    };
    let config = Config::load(Some(path), &overrides).expect("the config loads");
    let options = stepgate::proxy::ServeOptions {
        config_path: Some(path.to_path_buf()),
        overrides,
        ..options
    };
    launch(config, options, tempfile::tempdir().unwrap()).await
}

async fn launch(
    config: Config,
    options: stepgate::proxy::ServeOptions,
    state: tempfile::TempDir,
) -> Gate {
    let (addr, shutdown, task, handle) = start(config.clone(), options.clone()).await;
    let metrics_addr = handle.1;
    let handle = handle.0;
    Gate {
        addr,
        metrics_addr,
        config,
        handle: Some(handle),
        options,
        shutdown,
        task: Some(task),
        _state: state,
    }
}

async fn start(
    config: Config,
    options: stepgate::proxy::ServeOptions,
) -> (
    SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<()>,
    (stepgate::proxy::ServerHandle, Option<SocketAddr>),
) {
    let server = Server::bind_with(config, options)
        .await
        .expect("stepgate binds");
    let addr = server.local_addr();
    let handle = (server.handle(), server.metrics_addr());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    (addr, shutdown, task, handle)
}

/// For tests of the pipe rather than the gate: nothing is guarded, not even `unparsed`.
pub fn pipe_only(c: &mut Config) {
    c.rules = vec![stepgate::config::Rule {
        database: "*".into(),
        user: "*".into(),
        guard: Vec::new(),
        ..Default::default()
    }];
    c.allow_unparsed = true;
}

pub async fn gate() -> Gate {
    gate_with(|_| {}).await
}

impl Gate {
    /// tokio-postgres config for a connection through stepgate.
    pub fn config(&self, user: &str, dbname: &str) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(self.addr.ip().to_string())
            .port(self.addr.port())
            .user(user)
            .dbname(dbname);
        if user == pg().user {
            if let Some(p) = &pg().password {
                cfg.password(p);
            }
        }
        cfg
    }

    /// A connection through stepgate as the superuser to `dbname`.
    pub async fn client(&self, dbname: &str) -> tokio_postgres::Client {
        connect(self.config(&pg().user, dbname))
            .await
            .expect("connection through stepgate")
    }

    /// The session still works: a new connection answers a query.
    pub async fn assert_healthy(&self) {
        let c = self.client(&pg().dbname).await;
        let row = c.query_one("select 41 + 1", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);
    }

    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops the server and starts a new one on the same config and state directory (on a new port). Close
    /// the clients of the old one first: it keeps the state directory until its sessions end.
    pub async fn restart(&mut self) {
        self.stop().await;
        let (addr, shutdown, task, handle) = start(self.config.clone(), self.options.clone()).await;
        self.handle = Some(handle.0);
        self.metrics_addr = handle.1;
        self.addr = addr;
        self.shutdown = shutdown;
        self.task = Some(task);
    }

    /// Stops the server (it drains its sessions and releases the state directory); `restart` starts it again.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        // The handle keeps the old server's state alive: let go of it first.
        self.handle = None;
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), t).await;
        }
    }

    /// Reloads the running server's policy (see `ServerHandle::reload`).
    pub fn handle(&self) -> &stepgate::proxy::ServerHandle {
        self.handle.as_ref().expect("a running server")
    }

    /// The state directory (audit log).
    pub fn state_dir(&self) -> &std::path::Path {
        &self.config.state_dir
    }

    /// Every audit record so far.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        stepgate::audit::AuditLog::read_dir(&self.config.state_dir).unwrap()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The SQLSTATE of a tokio-postgres error, if the server (or stepgate) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// A self-signed certificate for localhost/127.0.0.1, written to `dir` as `cert.pem` and `key.pem`.
pub fn write_test_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate generation");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// Runs psql with a libpq connection string; returns (success, stdout, stderr).
pub fn psql(conninfo: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = std::process::Command::new("psql");
    c.arg(conninfo)
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .env_remove("PGOPTIONS")
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("psql runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}
