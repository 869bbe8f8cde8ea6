//! `RELOAD`: re-read the config file and the keyring, as SIGHUP does.

use crate::proxy::console::command::{Command, Ctx};
use crate::proxy::console::result::{ConsoleError, Table};

pub struct Reload;
pub(crate) static COMMAND: Reload = Reload;

impl Command for Reload {
    fn words(&self) -> &'static [&'static str] {
        &["RELOAD"]
    }
    fn help(&self) -> &'static str {
        "re-read the config file and the keyring (as SIGHUP)"
    }
    fn order(&self) -> u32 {
        70
    }
    fn columns(&self, _: &[String]) -> &'static [&'static str] {
        &[]
    }
    fn run(&self, cx: &Ctx<'_>, _: &[String]) -> Result<Table, ConsoleError> {
        let generation = cx.handle.reload().map_err(|e| ConsoleError::config(e.to_string()))?;
        Ok(Table { tag: format!("RELOAD {generation}"), ..Table::default() })
    }
}
