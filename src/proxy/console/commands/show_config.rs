//! `SHOW CONFIG`: the configuration in force. Settings a reload cannot change show the value the server runs
//! with, and name the config file's new value if it differs (it takes effect after a restart).

use crate::proxy::console::command::{Command, Ctx};
use crate::proxy::console::result::{ConsoleError, Table};

pub struct ShowConfig;
pub(crate) static COMMAND: ShowConfig = ShowConfig;

impl Command for ShowConfig {
    fn words(&self) -> &'static [&'static str] {
        &["SHOW", "CONFIG"]
    }
    fn help(&self) -> &'static str {
        "the configuration in force (settings waiting for a restart say so)"
    }
    fn order(&self) -> u32 {
        60
    }
    fn columns(&self, _: &[String]) -> &'static [&'static str] {
        &["field", "value"]
    }
    fn run(&self, cx: &Ctx<'_>, _: &[String]) -> Result<Table, ConsoleError> {
        // `running`: what the listener read at start; `c`: the reloadable policy in force.
        let running = &cx.shared.config;
        let c = &cx.gate.config;
        let restart = |key: &str, now: String, file: String| {
            if now == file {
                now
            } else {
                format!("{now} (the config file says {file}; {key} takes effect after a restart)")
            }
        };
        let tls = |t: &Option<crate::config::TlsConfig>| {
            t.as_ref()
                .map(|t| format!("cert {} (required: {})", t.cert.display(), t.required))
                .unwrap_or_else(|| "off".into())
        };
        let admin_listen = |c: &crate::config::Config| {
            c.admin.as_ref().and_then(|a| a.listen.clone()).unwrap_or_default()
        };
        let rules = c
            .rules
            .iter()
            .map(|r| {
                format!(
                    "database={} user={} guard={} signatures={} max_token_lifetime={}",
                    r.database,
                    r.user,
                    r.guard.iter().map(|g| g.as_str()).collect::<Vec<_>>().join("+"),
                    r.signatures,
                    humantime::format_duration(r.max_token_lifetime)
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        Ok(Table::fields(vec![
            (
                "config_file",
                cx.shared
                    .options
                    .config_path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(flags only)".into()),
            ),
            ("listen", restart("listen", running.listen.clone(), c.listen.clone())),
            ("upstream", restart("upstream", running.upstream.clone(), c.upstream.clone())),
            (
                "upstream_tls",
                restart(
                    "upstream_tls",
                    format!("{:?}", running.upstream_tls).to_lowercase(),
                    format!("{:?}", c.upstream_tls).to_lowercase(),
                ),
            ),
            (
                "state_dir",
                restart("state_dir", running.state_dir.display().to_string(), c.state_dir.display().to_string()),
            ),
            ("mode", cx.gate.mode.as_str().into()),
            ("instance", c.instance.clone().unwrap_or_default()),
            ("keyring", c.keyring.as_ref().map(|p| p.display().to_string()).unwrap_or_default()),
            ("signers", c.signers.iter().map(|s| s.name.clone()).collect::<Vec<_>>().join(", ")),
            (
                "rules",
                if rules.is_empty() {
                    "(default: every database and user; ddl+destructive+privileged+unparsed; 1 signature; 1h)".into()
                } else {
                    rules
                },
            ),
            ("allow_unparsed", c.allow_unparsed.to_string()),
            ("max_held_sql", c.max_held_sql.to_string()),
            (
                "max_connections",
                restart("max_connections", running.max_connections.to_string(), c.max_connections.to_string()),
            ),
            (
                "max_message_size",
                restart("max_message_size", running.max_message_size.to_string(), c.max_message_size.to_string()),
            ),
            (
                "startup_timeout",
                restart(
                    "startup_timeout",
                    humantime::format_duration(running.startup_timeout).to_string(),
                    humantime::format_duration(c.startup_timeout).to_string(),
                ),
            ),
            (
                "metrics_listen",
                restart(
                    "metrics_listen",
                    running.metrics_listen.clone().unwrap_or_default(),
                    c.metrics_listen.clone().unwrap_or_default(),
                ),
            ),
            ("admin_users", c.admin.as_ref().map(|a| a.users.join(", ")).unwrap_or_default()),
            ("admin_listen", restart("admin.listen", admin_listen(running), admin_listen(c))),
            ("tls", restart("tls", tls(&running.tls), tls(&c.tls))),
        ]))
    }
}
