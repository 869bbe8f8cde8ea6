//! A console command: the words that select it, its arguments, its help line and columns, and what it does.
//!
//! Every command is one file in `commands/` that defines `pub(crate) static COMMAND` implementing
//! [`Command`]; the build script lists the files, so adding a command is adding its file. HELP, the column
//! lists a Describe answers and the parser are all derived from the commands themselves.

use super::result::{ConsoleError, Table};
use crate::proxy::gate::context::GateContext;
use crate::proxy::reload::ServerHandle;
use crate::proxy::shared::Shared;

/// What a command runs against.
pub struct Ctx<'a> {
    pub shared: &'a Shared,
    /// The policy in force when the command started.
    pub gate: &'a GateContext,
    pub handle: &'a ServerHandle,
    /// The admin running the command.
    pub user: &'a str,
    /// Every command, for HELP.
    pub commands: &'a [&'static dyn Command],
}

/// One console command.
pub trait Command: Sync {
    /// The words that select the command, upper case (`["SHOW", "HELD"]`).
    fn words(&self) -> &'static [&'static str];
    /// The arguments after the words, as HELP shows them (`"[<id>]"`), or "".
    fn usage(&self) -> &'static str {
        ""
    }
    /// The fewest and the most arguments it takes.
    fn arity(&self) -> (usize, usize) {
        (0, 0)
    }
    /// One line for HELP; commands are listed by [`Command::order`].
    fn help(&self) -> &'static str;
    fn order(&self) -> u32;
    /// The result columns for these arguments (empty: the command returns no rows).
    fn columns(&self, args: &[String]) -> &'static [&'static str];
    fn run(&self, cx: &Ctx<'_>, args: &[String]) -> Result<Table, ConsoleError>;
    /// The held id the arguments name, for the `admin_action` audit record.
    fn held_id(&self, _args: &[String]) -> Option<String> {
        None
    }
    /// Takes the rest of the line as one argument, whitespace and newlines included (a signed token).
    fn takes_text(&self) -> bool {
        false
    }
    /// The command as its `admin_action` record shows it, when the line itself must not be kept whole.
    fn audited_as(&self, _args: &[String]) -> Option<String> {
        None
    }
}

/// A parsed command line.
#[derive(Clone)]
pub struct Invocation {
    pub command: Option<&'static dyn Command>,
    pub args: Vec<String>,
}

impl Invocation {
    /// Whether the line was empty (answered with EmptyQueryResponse).
    pub fn is_empty(&self) -> bool {
        self.command.is_none()
    }

    pub fn columns(&self) -> &'static [&'static str] {
        self.command.map_or(&[], |c| c.columns(&self.args))
    }
}

/// Picks the command whose words start the line (the longest match), case-insensitively.
pub fn parse(commands: &[&'static dyn Command], text: &str) -> Result<Invocation, ConsoleError> {
    let t = text.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = t.split_whitespace().collect();
    if words.is_empty() {
        return Ok(Invocation {
            command: None,
            args: Vec::new(),
        });
    }
    let found = commands
        .iter()
        .filter(|c| {
            let w = c.words();
            words.len() >= w.len() && w.iter().zip(&words).all(|(a, b)| a.eq_ignore_ascii_case(b))
        })
        .max_by_key(|c| c.words().len());
    let unknown = || {
        ConsoleError::syntax(format!(
            "unknown command {:?}; HELP lists the commands",
            words.iter().take(3).cloned().collect::<Vec<_>>().join(" ")
        ))
    };
    let cmd = found.ok_or_else(unknown)?;
    let args: Vec<String> = if cmd.takes_text() {
        // What follows the command's words, as written.
        let mut rest = t;
        for _ in 0..cmd.words().len() {
            rest = rest.trim_start();
            rest = &rest[rest.find(char::is_whitespace).unwrap_or(rest.len())..];
        }
        let rest = rest.trim();
        if rest.is_empty() {
            Vec::new()
        } else {
            vec![rest.to_string()]
        }
    } else {
        words[cmd.words().len()..]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let (fewest, most) = cmd.arity();
    if args.len() < fewest || args.len() > most {
        // `SHOW HELD x y` is no command at all; say so as for an unknown one.
        return Err(unknown());
    }
    Ok(Invocation {
        command: Some(*cmd),
        args,
    })
}

/// A held id argument: 8 characters of a-z0-9, quotes allowed.
pub fn held_id(w: &str) -> Result<String, ConsoleError> {
    let id = w.trim_matches('\'').to_ascii_lowercase();
    if id.len() == 8
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(id)
    } else {
        Err(ConsoleError::argument(format!(
            "{w:?} is not a held id (8 characters of a-z0-9)"
        )))
    }
}
