//! `HELP`: the commands, from the commands themselves.

use crate::proxy::console::command::{Command, Ctx};
use crate::proxy::console::result::{ConsoleError, Table};

pub struct Help;
pub(crate) static COMMAND: Help = Help;

impl Command for Help {
    fn words(&self) -> &'static [&'static str] {
        &["HELP"]
    }
    fn help(&self) -> &'static str {
        "this list"
    }
    fn order(&self) -> u32 {
        100
    }
    fn columns(&self, _: &[String]) -> &'static [&'static str] {
        &["command", "what it does"]
    }
    fn run(&self, cx: &Ctx<'_>, _: &[String]) -> Result<Table, ConsoleError> {
        let mut t = Table::new(self.columns(&[]));
        let mut all: Vec<&dyn Command> = cx.commands.to_vec();
        all.sort_by_key(|c| c.order());
        for c in all {
            let mut name = c.words().join(" ");
            if !c.usage().is_empty() {
                name = format!("{name} {}", c.usage());
            }
            t.rows.push(vec![name, c.help().to_string()]);
        }
        Ok(t)
    }
}
