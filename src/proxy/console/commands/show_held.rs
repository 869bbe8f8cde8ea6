//! `SHOW HELD [<id>]`: held statements, or one of them with the payload to sign (from the registry in
//! memory; the audit log is not read).

use crate::proxy::console::command::{held_id, Command, Ctx};
use crate::proxy::console::result::{ConsoleError, Table};

pub struct ShowHeld;
pub(crate) static COMMAND: ShowHeld = ShowHeld;

impl Command for ShowHeld {
    fn words(&self) -> &'static [&'static str] {
        &["SHOW", "HELD"]
    }
    fn usage(&self) -> &'static str {
        "[<id>]"
    }
    fn arity(&self) -> (usize, usize) {
        (0, 1)
    }
    fn help(&self) -> &'static str {
        "held statements, oldest first; with an id: its full SQL, fingerprints, and the payload to sign"
    }
    fn order(&self) -> u32 {
        10
    }
    fn columns(&self, args: &[String]) -> &'static [&'static str] {
        if args.is_empty() {
            &["id", "time", "status", "user", "database", "class", "sql"]
        } else {
            &["field", "value"]
        }
    }
    fn held_id(&self, args: &[String]) -> Option<String> {
        args.first().and_then(|a| held_id(a).ok())
    }
    fn run(&self, cx: &Ctx<'_>, args: &[String]) -> Result<Table, ConsoleError> {
        let status_of = |e: &crate::gate::HeldEntry| {
            serde_json::to_value(e.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
        };
        let Some(arg) = args.first() else {
            let mut t = Table::new(self.columns(args));
            for e in cx.gate.registry.list() {
                let status = status_of(&e);
                t.rows.push(vec![
                    e.id,
                    e.time,
                    status,
                    e.session.user,
                    e.session.database,
                    e.class.as_str().into(),
                    crate::check::first_line(&e.sql, 100),
                ]);
            }
            return Ok(t);
        };
        let id = held_id(arg)?;
        let e = cx.gate.registry.get(&id).ok_or_else(|| ConsoleError::not_found(format!("no held statement {id}")))?;
        let payload = crate::token::held::payload_for(
            &e,
            &cx.gate.config,
            std::time::Duration::from_secs(30 * 60),
            std::time::SystemTime::now(),
        )
        .unwrap_or_else(|err| format!("(no payload: {err})"));
        Ok(Table::fields(vec![
            ("id", e.id.clone()),
            ("time", e.time.clone()),
            ("status", status_of(&e)),
            ("user", e.session.user.clone()),
            ("database", e.session.database.clone()),
            ("client_addr", e.session.client_addr.clone()),
            ("application_name", e.session.application_name.clone()),
            ("class", e.class.as_str().into()),
            ("reason", e.reason.clone()),
            ("sql", e.sql.clone()),
            ("fingerprints", e.fingerprints.join("\n")),
            ("payload to sign", payload),
            ("make a token", format!("stepgate token new --held {id} | gpg --clearsign")),
        ]))
    }
}
