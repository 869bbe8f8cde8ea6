//! `SHOW SESSIONS`: the client sessions open now.

use crate::proxy::console::command::{Command, Ctx};
use crate::proxy::console::result::{ConsoleError, Table};

pub struct ShowSessions;
pub(crate) static COMMAND: ShowSessions = ShowSessions;

impl Command for ShowSessions {
    fn words(&self) -> &'static [&'static str] {
        &["SHOW", "SESSIONS"]
    }
    fn help(&self) -> &'static str {
        "client sessions open now"
    }
    fn order(&self) -> u32 {
        30
    }
    fn columns(&self, _: &[String]) -> &'static [&'static str] {
        &["session_id", "user", "database", "client_addr", "application_name", "tls", "connected"]
    }
    fn run(&self, cx: &Ctx<'_>, args: &[String]) -> Result<Table, ConsoleError> {
        let mut t = Table::new(self.columns(args));
        let mut v: Vec<_> = cx.shared.sessions.iter().map(|e| (*e.key(), e.value().clone())).collect();
        v.sort_by_key(|(id, _)| *id);
        for (id, s) in v {
            t.rows.push(vec![
                id.to_string(),
                s.user,
                s.database,
                s.client_addr,
                s.application_name,
                s.tls.to_string(),
                s.connected,
            ]);
        }
        Ok(t)
    }
}
