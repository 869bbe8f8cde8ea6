//! `SHOW AUDIT [n]`: the last n audit records; tokens appear as a hash only.

use crate::proxy::console::command::{Command, Ctx};
use crate::proxy::console::result::{ConsoleError, Table};

pub struct ShowAudit;
pub(crate) static COMMAND: ShowAudit = ShowAudit;

impl Command for ShowAudit {
    fn words(&self) -> &'static [&'static str] {
        &["SHOW", "AUDIT"]
    }
    fn usage(&self) -> &'static str {
        "[n]"
    }
    fn arity(&self) -> (usize, usize) {
        (0, 1)
    }
    fn help(&self) -> &'static str {
        "the last n audit records (default 20); tokens appear as id and hash only"
    }
    fn order(&self) -> u32 {
        20
    }
    fn columns(&self, _: &[String]) -> &'static [&'static str] {
        &["seq", "time", "event", "user", "database", "reference", "detail"]
    }
    fn run(&self, cx: &Ctx<'_>, args: &[String]) -> Result<Table, ConsoleError> {
        let n: usize = match args.first() {
            None => 20,
            Some(a) => a.parse().map_err(|_| ConsoleError::argument(format!("{a:?} is not a number of records")))?,
        };
        let records = match &cx.gate.audit {
            Some(log) => crate::audit::AuditLog::read_dir(log.dir()).map_err(|e| ConsoleError::io(e.to_string()))?,
            None => Vec::new(),
        };
        let mut t = Table::new(self.columns(args));
        let start = records.len().saturating_sub(n);
        for r in &records[start..] {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            let reference =
                [s("held_id"), s("token_id")].into_iter().filter(|x| !x.is_empty()).collect::<Vec<_>>().join(" ");
            let mut detail: Vec<String> = ["sql", "reason", "outcome", "command", "fingerprint"]
                .iter()
                .map(|k| s(k))
                .filter(|x| !x.is_empty())
                .collect();
            if let Some(tok) = r["token"].as_str() {
                // The token is evidence in the log, never shown: its hash stands for it.
                detail.push(format!("token {}", crate::audit::hash_line(tok.as_bytes())));
            }
            t.rows.push(vec![
                r["seq"].as_u64().unwrap_or(0).to_string(),
                s("time"),
                s("event"),
                s("user"),
                s("database"),
                reference,
                crate::gate::redact(&detail.join(" · ")),
            ]);
        }
        Ok(t)
    }
}
