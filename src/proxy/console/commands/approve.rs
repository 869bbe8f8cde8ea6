//! `APPROVE '<signed token>'`: hand a signed token to the running stepgate. It is verified as a SET token
//! would be, recorded (`approved`, with the admin), and then covers the statements it lists for any session of
//! its database (and user), each use once, until its not-after. `stepgate approve token.asc` sends this.

use crate::proxy::authz::ApproveError;
use crate::proxy::console::command::{Command, Ctx};
use crate::proxy::console::result::{ConsoleError, Table};

pub struct Approve;
pub(crate) static COMMAND: Approve = Approve;

/// The token text of the argument: a string constant in any of PostgreSQL's spellings (`'…'`, `E'…'`,
/// `$$…$$`), or the armored text as it is.
fn token_text(arg: &str) -> Result<String, ConsoleError> {
    if arg.starts_with("-----BEGIN") {
        return Ok(arg.to_string());
    }
    crate::classify::tree::string_constant(arg).ok_or_else(|| {
        ConsoleError::argument(
            "APPROVE takes one signed token, as a string ('…', E'…' or $$…$$) or as it is",
        )
    })
}

impl Command for Approve {
    fn words(&self) -> &'static [&'static str] {
        &["APPROVE"]
    }
    fn usage(&self) -> &'static str {
        "'<signed token>'"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn help(&self) -> &'static str {
        "approve a signed token for every session it names (each listed use once)"
    }
    fn order(&self) -> u32 {
        75
    }
    fn columns(&self, _: &[String]) -> &'static [&'static str] {
        &["field", "value"]
    }
    fn takes_text(&self) -> bool {
        true
    }
    fn audited_as(&self, _: &[String]) -> Option<String> {
        // The `approved` record keeps the token; this one names the command only.
        Some("APPROVE (a signed token)".into())
    }
    fn run(&self, cx: &Ctx<'_>, args: &[String]) -> Result<Table, ConsoleError> {
        let text = token_text(&args[0])?;
        let token = cx
            .gate
            .approve(text.as_bytes(), cx.user)
            .map_err(|e| match e {
                ApproveError::Token(_) => ConsoleError {
                    code: "28000",
                    message: format!("stepgate: {e}"),
                },
                ApproveError::Already(_) => ConsoleError::argument(e.to_string()),
                ApproveError::AuditUnavailable => ConsoleError::io(e.to_string()),
            })?;
        let p = &token.auth.payload;
        let mut t = Table::fields(vec![
            ("token", p.id.clone()),
            ("database", p.database.clone()),
            ("user", p.user.clone().unwrap_or_else(|| "*".into())),
            (
                "not_after",
                humantime::format_rfc3339_seconds(p.not_after).to_string(),
            ),
            ("statements", p.statements.len().to_string()),
            (
                "signers",
                token
                    .auth
                    .signers
                    .iter()
                    .map(|(_, n)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ]);
        t.tag = "APPROVE".into();
        Ok(t)
    }
}
