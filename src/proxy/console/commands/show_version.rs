//! `SHOW VERSION`: what is running — stepgate's version and the PostgreSQL grammar it judges SQL with.

use crate::proxy::console::command::{Command, Ctx};
use crate::proxy::console::result::{ConsoleError, Table};

pub struct ShowVersion;
pub(crate) static COMMAND: ShowVersion = ShowVersion;

impl Command for ShowVersion {
    fn words(&self) -> &'static [&'static str] {
        &["SHOW", "VERSION"]
    }
    fn help(&self) -> &'static str {
        "stepgate's version and the PostgreSQL parser it judges SQL with"
    }
    fn order(&self) -> u32 {
        90
    }
    fn columns(&self, _: &[String]) -> &'static [&'static str] {
        &["field", "value"]
    }
    fn run(&self, cx: &Ctx<'_>, _: &[String]) -> Result<Table, ConsoleError> {
        Ok(Table::fields(vec![
            ("stepgate", env!("CARGO_PKG_VERSION").to_string()),
            (
                "parser",
                "PostgreSQL 18 grammar (libpg_query, pg_query crate 18)".to_string(),
            ),
            ("mode", cx.gate.mode.as_str().to_string()),
        ]))
    }
}
