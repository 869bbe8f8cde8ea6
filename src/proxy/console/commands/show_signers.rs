//! `SHOW SIGNERS`: signers, their keys' fingerprints, expiry and revocation state.

use crate::proxy::console::command::{Command, Ctx};
use crate::proxy::console::result::{ConsoleError, Table};

pub struct ShowSigners;
pub(crate) static COMMAND: ShowSigners = ShowSigners;

impl Command for ShowSigners {
    fn words(&self) -> &'static [&'static str] {
        &["SHOW", "SIGNERS"]
    }
    fn help(&self) -> &'static str {
        "signers, key fingerprints, expiry and revocation state"
    }
    fn order(&self) -> u32 {
        40
    }
    fn columns(&self, _: &[String]) -> &'static [&'static str] {
        &["name", "fingerprint", "state", "expires", "databases", "classes", "user_id"]
    }
    fn run(&self, cx: &Ctx<'_>, args: &[String]) -> Result<Table, ConsoleError> {
        let mut t = Table::new(self.columns(args));
        for r in crate::token::signers::signer_rows(&cx.gate.config, &cx.gate.policy.keyring) {
            t.rows.push(vec![r.name, r.fingerprint, r.state, r.expires, r.databases, r.classes, r.user_id]);
        }
        Ok(t)
    }
}
