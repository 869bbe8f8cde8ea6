//! One admin's console session: runs commands against the policy in force, audits each, and notices when
//! the user is no longer an admin.

use tracing::warn;

use super::command::{Ctx, Invocation};
use super::commands;
use super::result::{ConsoleError, Table};
use crate::audit::AuditEvent;
use crate::proxy::reload::ServerHandle;
use crate::proxy::shared::Shared;
use crate::wire::reply::ErrorReply;

/// The console session of one admin.
pub(super) struct Console<'a> {
    pub shared: &'a Shared,
    pub handle: ServerHandle,
    pub user: String,
    pub client_addr: String,
}

impl Console<'_> {
    pub fn audit(&self, command: &str, outcome: &str, held_id: Option<String>) {
        let gate = self.shared.gate.load();
        if let Some(log) = &gate.audit {
            let event = AuditEvent::AdminAction {
                user: self.user.clone(),
                client_addr: self.client_addr.clone(),
                command: command.to_string(),
                outcome: outcome.to_string(),
                held_id,
            };
            if let Err(e) = log.write(&event, false) {
                warn!(error = %e, "audit log write failed");
            }
        }
    }

    /// The FATAL to end the session with if the policy in force no longer lists this user as an admin.
    pub fn revoked(&self) -> Option<ErrorReply> {
        let gate = self.shared.gate.load();
        let admin = gate
            .config
            .admin
            .as_ref()
            .is_some_and(|a| a.users.contains(&self.user));
        if admin {
            return None;
        }
        self.audit("session", "closed: no longer an admin user", None);
        warn!(user = %self.user, "console session closed: the user was removed from [admin] users");
        Some(revoked_fatal(&self.user))
    }

    pub fn run(&self, inv: &Invocation, text: &str) -> Result<Table, ConsoleError> {
        let Some(cmd) = inv.command else {
            return Ok(Table::default());
        };
        let gate = self.shared.gate.load();
        let cx = Ctx {
            shared: self.shared,
            gate: &gate,
            handle: &self.handle,
            user: &self.user,
            commands: commands::ALL,
        };
        let mut result = cmd.run(&cx, &inv.args);
        if let Ok(t) = &mut result {
            if t.tag.is_empty() {
                t.tag = format!("SHOW {}", t.rows.len());
            }
        }
        let held_id = cmd.held_id(&inv.args);
        let shown = cmd
            .audited_as(&inv.args)
            .unwrap_or_else(|| text.trim().to_string());
        match &result {
            Ok(_) => self.audit(&shown, "ok", held_id),
            Err(e) => self.audit(&shown, &format!("error: {e}"), held_id),
        }
        result
    }
}

/// The FATAL a console session ends with when its user is no longer an admin.
fn revoked_fatal(user: &str) -> ErrorReply {
    ErrorReply::fatal(
        "28000",
        format!("stepgate: user \"{user}\" is no longer in [admin] users; console session closed"),
    )
}
