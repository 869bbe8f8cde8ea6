//! `DISMISS <id>`: mark a held statement as dismissed.

use crate::proxy::console::command::{held_id, Command, Ctx};
use crate::proxy::console::result::{ConsoleError, Table};

pub struct Dismiss;
pub(crate) static COMMAND: Dismiss = Dismiss;

impl Command for Dismiss {
    fn words(&self) -> &'static [&'static str] {
        &["DISMISS"]
    }
    fn usage(&self) -> &'static str {
        "<id>"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn help(&self) -> &'static str {
        "mark a held statement as dismissed"
    }
    fn order(&self) -> u32 {
        80
    }
    fn columns(&self, _: &[String]) -> &'static [&'static str] {
        &[]
    }
    fn held_id(&self, args: &[String]) -> Option<String> {
        args.first().and_then(|a| held_id(a).ok())
    }
    fn run(&self, cx: &Ctx<'_>, args: &[String]) -> Result<Table, ConsoleError> {
        let id = held_id(&args[0])?;
        match cx.gate.registry.dismiss(&id) {
            Ok(()) => {}
            Err(crate::gate::DismissError::NotFound) => {
                return Err(ConsoleError::not_found(format!("no held statement {id}")))
            }
            Err(crate::gate::DismissError::Authorized) => {
                return Err(ConsoleError {
                    code: "55000",
                    message: format!(
                        "held statement {id} was authorized (a token or an approval covered it): it ran or is running, and cannot be dismissed"
                    ),
                })
            }
        }
        Ok(Table { tag: "DISMISS".into(), ..Table::default() })
    }
}
