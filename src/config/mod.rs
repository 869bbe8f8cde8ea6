//! The TOML configuration (`stepgate.toml`) and the command-line overrides applied on top of it.
//!
//! Loading happens in two stages: serde reads the raw file (unknown keys are rejected, and a bad value is
//! reported with the file, line and key), then [`Config::validate`] checks what serde cannot. Relative
//! paths resolve against the folder of the config file. Every key has a default, so flags alone can run
//! stepgate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

pub mod allow;
pub mod class;
pub mod mode;
pub mod rule;
pub mod signer;
pub mod values;

pub use class::Class;
pub use mode::Mode;
pub use rule::{pattern_matches, OnHold, Rule, DEFAULT_MAX_TOKEN_LIFETIME, DEFAULT_WAIT_TIMEOUT};
pub use signer::SignerPolicy;
use values::{de_duration, de_size};
pub use values::{parse_size, split_host_port, MAX_MESSAGE_SIZE, MIN_MESSAGE_SIZE};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:6432";
pub const DEFAULT_UPSTREAM: &str = "127.0.0.1:5432";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: String,
        key: &'static str,
        message: String,
    },
}

/// How stepgate talks to the upstream server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS when the server offers it, plain TCP otherwise.
    Prefer,
    /// TLS or nothing (like libpq's sslmode=require: encrypted, certificate not verified).
    Require,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The file as written, before validation. Field docs are the reference for each key.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Address clients connect to. [127.0.0.1:6432]
    listen: Option<String>,
    /// The PostgreSQL server (host:port). [127.0.0.1:5432]
    upstream: Option<String>,
    /// disable | prefer | require. [disable]
    upstream_tls: Option<UpstreamTls>,
    /// Where stepgate keeps its state, relative to this file. [./stepgate-state]
    state_dir: Option<PathBuf>,
    /// Client connections accepted at once; more get SQLSTATE 53300. [1000]
    max_connections: Option<usize>,
    /// Time a client has to finish the startup and login. [10s]
    #[serde(default, deserialize_with = "de_duration")]
    startup_timeout: Option<Duration>,
    /// On SIGTERM/SIGINT, how long open sessions may run before they are closed. [30s]
    #[serde(default, deserialize_with = "de_duration")]
    shutdown_timeout: Option<Duration>,
    /// Largest message a client may send after login. [1GiB]
    #[serde(default, deserialize_with = "de_size")]
    max_message_size: Option<usize>,
    /// Most of one statement's SQL a held entry, its audit record and its log line keep (the fingerprint is
    /// of the whole text). [64KiB]
    #[serde(default, deserialize_with = "de_size")]
    max_held_sql: Option<usize>,
    /// text | json. [text]
    log_format: Option<LogFormat>,
    /// enforce | observe. [enforce]
    mode: Option<Mode>,
    /// Terminate client TLS.
    tls: Option<RawTls>,
    /// Let `unparsed` statements through when a rule does not guard them. [false]
    allow_unparsed: Option<bool>,
    /// Functions that make a statement privileged wherever they are called; replaces the built-in list.
    dangerous_functions: Option<Vec<String>>,
    /// Rules, first match wins. [one rule for every database and user guarding ddl, destructive,
    /// privileged, unparsed]
    #[serde(default)]
    rule: Vec<RawRule>,
    /// When set, tokens must name this instance.
    instance: Option<String>,
    /// Where to serve Prometheus metrics (`GET /metrics`).
    metrics_listen: Option<String>,
    /// Armored public keys of the signers: one file, or a directory of files.
    keyring: Option<PathBuf>,
    /// Who may sign tokens, and for what.
    #[serde(default)]
    signer: Vec<RawSigner>,
    /// The DBA console (virtual database `stepgate`).
    admin: Option<RawAdmin>,
    /// Statements that pass without a token, recorded as `allowed`.
    #[serde(default)]
    allow: Vec<allow::RawAllow>,
    /// Files of `[[allow]]` entries (the presets in fixtures/allow/), relative to this file.
    #[serde(default)]
    include: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// Who may open the console.
    #[serde(default)]
    users: Vec<String>,
    /// Serve the console on its own address (else on `listen`).
    listen: Option<String>,
    /// Database the login is checked against upstream. [postgres]
    auth_database: Option<String>,
}

/// Who may open the DBA console, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub users: Vec<String>,
    pub listen: Option<String>,
    pub auth_database: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigner {
    name: String,
    /// Primary key fingerprint (hex; spaces allowed).
    fingerprint: String,
    /// Database names or patterns. [*]
    databases: Option<Vec<String>>,
    /// Classes this signer may authorize. [ddl, destructive, privileged, unparsed]
    classes: Option<Vec<Class>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    /// Database name or pattern (`*`, `prefix*`). [*]
    database: Option<String>,
    /// User name or pattern. [*]
    user: Option<String>,
    /// Classes held without a token. [ddl, destructive, privileged, unparsed]
    guard: Option<Vec<Class>>,
    /// Distinct signers a token needs. [1]
    signatures: Option<usize>,
    /// Longest time from a signature to the token's not-after. [1h]
    #[serde(default, deserialize_with = "de_duration")]
    max_token_lifetime: Option<Duration>,
    /// Tokens may list only statements whose tables and other objects are schema-qualified (an
    /// unqualified name resolves through the session's search_path when it runs). [false]
    require_qualified_names: Option<bool>,
    /// What a statement held without a token does: `refuse` (fail at once) or `wait` (outside a
    /// transaction block, wait up to `wait_timeout` for an approval, then run or fail). [refuse]
    on_hold: Option<OnHold>,
    /// How long `on_hold = "wait"` waits for an approval (1s … 1h). [60s]
    #[serde(default, deserialize_with = "de_duration")]
    wait_timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    required: bool,
}

/// Client-side TLS: certificate chain and key (PEM), and whether plaintext clients are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub required: bool,
}

/// The most SQL text a held entry, its audit record and its log line keep of one message or statement
/// unless the config says otherwise (`max_held_sql`). The fingerprints are of the whole text; a longer
/// statement is signed from its file (`token new --file`), not from the held entry.
pub const MAX_HELD_SQL: usize = 64 * 1024;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub upstream: String,
    pub upstream_tls: UpstreamTls,
    pub state_dir: PathBuf,
    pub max_connections: usize,
    pub startup_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub max_message_size: usize,
    /// Most of one statement's SQL a held entry, its audit record and its log line keep.
    pub max_held_sql: usize,
    pub log_format: LogFormat,
    pub tls: Option<TlsConfig>,
    pub mode: Mode,
    pub allow_unparsed: bool,
    /// None: the built-in list ([`crate::classify::default_dangerous_functions`]).
    pub dangerous_functions: Option<Vec<String>>,
    pub rules: Vec<Rule>,
    /// When set, tokens must name this instance.
    pub instance: Option<String>,
    /// Public keys of the signers (file or directory), resolved against the config's folder.
    pub keyring: Option<PathBuf>,
    pub signers: Vec<SignerPolicy>,
    /// `[[allow]]` entries, the config's own then its includes'.
    pub allow: Vec<allow::Allow>,
    /// Where to serve Prometheus metrics (`GET /metrics`); None: not served.
    pub metrics_listen: Option<String>,
    /// The DBA console; None: no console.
    pub admin: Option<AdminConfig>,
}

/// Command-line flags that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub upstream_tls: Option<UpstreamTls>,
    pub log_format: Option<LogFormat>,
    pub mode: Option<Mode>,
    pub keyring: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.into(),
            upstream: DEFAULT_UPSTREAM.into(),
            upstream_tls: UpstreamTls::Disable,
            state_dir: PathBuf::from("stepgate-state"),
            max_connections: 1000,
            startup_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            max_message_size: 1 << 30,
            max_held_sql: MAX_HELD_SQL,
            log_format: LogFormat::Text,
            tls: None,
            mode: Mode::Enforce,
            allow_unparsed: false,
            dangerous_functions: None,
            rules: Vec::new(),
            instance: None,
            keyring: None,
            signers: Vec::new(),
            allow: Vec::new(),
            metrics_listen: None,
            admin: None,
        }
    }
}

impl Config {
    /// Loads `path` (if given) and applies `overrides`. Without a file, defaults and flags are used and
    /// relative paths resolve against the current directory.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let base = path.parent().unwrap_or(Path::new("."));
                Self::from_toml(&text, base, &path.display().to_string())?
            }
            None => Config::default(),
        };
        config.with_overrides(overrides)
    }

    /// Parses TOML text; `base` is the folder relative paths resolve against, `source` names the file in
    /// errors.
    pub fn from_toml(text: &str, base: &Path, source: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: source.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let d = Config::default();
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let allow = allow::load(raw.allow, raw.include, base, source).map_err(|e| match e {
            allow::AllowError::Read { path, source } => ConfigError::Read { path, source },
            allow::AllowError::Parse { path, message } => ConfigError::Parse { path, message },
            allow::AllowError::Invalid { path, message } => ConfigError::Invalid {
                path,
                key: "allow",
                message,
            },
        })?;
        let config = Config {
            listen: raw.listen.unwrap_or(d.listen),
            upstream: raw.upstream.unwrap_or(d.upstream),
            upstream_tls: raw.upstream_tls.unwrap_or_default(),
            state_dir: resolve(raw.state_dir.unwrap_or(d.state_dir)),
            max_connections: raw.max_connections.unwrap_or(d.max_connections),
            startup_timeout: raw.startup_timeout.unwrap_or(d.startup_timeout),
            shutdown_timeout: raw.shutdown_timeout.unwrap_or(d.shutdown_timeout),
            max_message_size: raw.max_message_size.unwrap_or(d.max_message_size),
            max_held_sql: raw.max_held_sql.unwrap_or(d.max_held_sql),
            log_format: raw.log_format.unwrap_or_default(),
            tls: raw.tls.map(|t| TlsConfig {
                cert: resolve(t.cert),
                key: resolve(t.key),
                required: t.required,
            }),
            mode: raw.mode.unwrap_or_default(),
            allow_unparsed: raw.allow_unparsed.unwrap_or(false),
            dangerous_functions: raw.dangerous_functions,
            rules: raw
                .rule
                .into_iter()
                .map(|r| Rule {
                    database: r.database.unwrap_or_else(|| "*".into()),
                    user: r.user.unwrap_or_else(|| "*".into()),
                    guard: r.guard.unwrap_or_else(|| Class::DEFAULT_GUARDED.to_vec()),
                    signatures: r.signatures.unwrap_or(1),
                    max_token_lifetime: r.max_token_lifetime.unwrap_or(DEFAULT_MAX_TOKEN_LIFETIME),
                    require_qualified_names: r.require_qualified_names.unwrap_or(false),
                    on_hold: r.on_hold.unwrap_or_default(),
                    wait_timeout: r.wait_timeout.unwrap_or(DEFAULT_WAIT_TIMEOUT),
                })
                .collect(),
            instance: raw.instance,
            metrics_listen: raw.metrics_listen,
            admin: raw.admin.map(|a| AdminConfig {
                users: a.users,
                listen: a.listen,
                auth_database: a.auth_database.unwrap_or_else(|| "postgres".into()),
            }),
            keyring: raw.keyring.map(resolve),
            allow,
            signers: raw
                .signer
                .into_iter()
                .map(|s| SignerPolicy {
                    name: s.name,
                    fingerprint: s
                        .fingerprint
                        .chars()
                        .filter(|c| !c.is_whitespace())
                        .collect::<String>()
                        .to_ascii_uppercase(),
                    databases: s.databases.unwrap_or_else(|| vec!["*".into()]),
                    classes: s.classes.unwrap_or_else(|| Class::DEFAULT_GUARDED.to_vec()),
                })
                .collect(),
        };
        config.validate(source)?;
        Ok(config)
    }

    /// The rule for a session: the first `[[rule]]` that matches, else the default rule.
    pub fn rule_for(&self, database: &str, user: &str) -> Rule {
        self.rules
            .iter()
            .find(|r| r.matches(database, user))
            .cloned()
            .unwrap_or_default()
    }

    /// The settings a reload cannot change, by name, that differ between the running `self` and `new`. The
    /// listener reads them once (addresses, upstream, TLS, limits, timeouts, the state directory); everything
    /// else is policy and takes effect at the reload. Destructured field by field, so a new setting has to be
    /// sorted into one kind or the other before this compiles.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let Config {
            listen,
            upstream,
            upstream_tls,
            state_dir,
            max_connections,
            startup_timeout,
            shutdown_timeout,
            max_message_size,
            log_format,
            tls,
            metrics_listen,
            admin,
            // Policy: reloaded.
            mode: _,
            max_held_sql: _,
            allow: _,
            allow_unparsed: _,
            dangerous_functions: _,
            rules: _,
            instance: _,
            keyring: _,
            signers: _,
        } = self;
        let admin_listen = |a: &Option<AdminConfig>| a.as_ref().and_then(|a| a.listen.clone());
        [
            ("listen", *listen != new.listen),
            ("upstream", *upstream != new.upstream),
            ("upstream_tls", *upstream_tls != new.upstream_tls),
            ("state_dir", *state_dir != new.state_dir),
            ("max_connections", *max_connections != new.max_connections),
            ("startup_timeout", *startup_timeout != new.startup_timeout),
            (
                "shutdown_timeout",
                *shutdown_timeout != new.shutdown_timeout,
            ),
            (
                "max_message_size",
                *max_message_size != new.max_message_size,
            ),
            ("log_format", *log_format != new.log_format),
            ("tls", *tls != new.tls),
            ("metrics_listen", *metrics_listen != new.metrics_listen),
            (
                "admin.listen",
                admin_listen(admin) != admin_listen(&new.admin),
            ),
        ]
        .into_iter()
        .filter_map(|(k, changed)| changed.then_some(k))
        .collect()
    }

    /// Whether `class` is held under `rule`. `unparsed` stays guarded even when the rule omits it, unless
    /// `allow_unparsed = true`.
    pub fn is_guarded(&self, rule: &Rule, class: Class) -> bool {
        rule.guard.contains(&class) || (class == Class::Unparsed && !self.allow_unparsed)
    }

    fn with_overrides(mut self, o: &Overrides) -> Result<Config, ConfigError> {
        if let Some(v) = &o.listen {
            self.listen = v.clone();
        }
        if let Some(v) = &o.upstream {
            self.upstream = v.clone();
        }
        if let Some(v) = &o.state_dir {
            self.state_dir = v.clone();
        }
        if let Some(v) = o.upstream_tls {
            self.upstream_tls = v;
        }
        if let Some(v) = o.log_format {
            self.log_format = v;
        }
        if let Some(v) = o.mode {
            self.mode = v;
        }
        if let Some(v) = &o.keyring {
            self.keyring = Some(v.clone());
        }
        self.validate("command line")?;
        Ok(self)
    }

    fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let invalid = |key, message: String| ConfigError::Invalid {
            path: source.to_string(),
            key,
            message,
        };
        for (key, addr) in [("listen", &self.listen), ("upstream", &self.upstream)]
            .into_iter()
            .chain(self.metrics_listen.iter().map(|m| ("metrics_listen", m)))
            .chain(
                self.admin
                    .iter()
                    .filter_map(|a| a.listen.as_ref())
                    .map(|l| ("admin.listen", l)),
            )
        {
            if split_host_port(addr).is_none() {
                return Err(invalid(key, format!("{addr:?} is not host:port")));
            }
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1".into()));
        }
        if self.startup_timeout.is_zero() {
            return Err(invalid("startup_timeout", "must be above zero".into()));
        }
        if !(MIN_MESSAGE_SIZE..=MAX_MESSAGE_SIZE).contains(&self.max_message_size) {
            return Err(invalid(
                "max_message_size",
                format!("must be between {MIN_MESSAGE_SIZE} bytes and 1GiB"),
            ));
        }
        if !(1024..=MAX_MESSAGE_SIZE).contains(&self.max_held_sql) {
            return Err(invalid(
                "max_held_sql",
                "must be between 1KiB and 1GiB".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for s in &self.signers {
            let hex_ok = s.fingerprint.chars().all(|c| c.is_ascii_hexdigit());
            if !(hex_ok && matches!(s.fingerprint.len(), 40 | 64)) {
                return Err(invalid(
                    "signer.fingerprint",
                    format!(
                        "signer {:?}: {:?} is not a key fingerprint (40 or 64 hex digits)",
                        s.name, s.fingerprint
                    ),
                ));
            }
            if !names.insert(s.name.as_str()) {
                return Err(invalid(
                    "signer.name",
                    format!("signer {:?} is named twice", s.name),
                ));
            }
            if s.classes.is_empty() || s.databases.is_empty() {
                return Err(invalid(
                    "signer",
                    format!(
                        "signer {:?} may authorize nothing (empty databases or classes)",
                        s.name
                    ),
                ));
            }
        }
        if !self.signers.is_empty() && self.keyring.is_none() {
            return Err(invalid(
                "keyring",
                "[[signer]]s are named but no keyring holds their public keys".into(),
            ));
        }
        for r in &self.rules {
            r.check(&self.signers, self.admin.is_some())
                .map_err(|(key, message)| invalid(key, message))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
