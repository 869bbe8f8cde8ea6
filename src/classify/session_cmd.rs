//! Statements the gate treats by what they do to the session rather than by their class: `SET`/`RESET`/`SHOW`
//! of a stepgate setting, SQL `PREPARE`/`EXECUTE`/`DEALLOCATE`, `DISCARD ALL`, and any other mention of a
//! stepgate setting (refused, never forwarded). Read from the statement's tokens as PostgreSQL's scanner
//! produced them; names are cut as the server stores them.

use super::lex::{Kind, Token};

/// What a statement is to the gate, beyond its class.
pub enum SessionCommand {
    Plain,
    /// Names a stepgate setting in a form that is not accepted: refused, never forwarded.
    Mention,
    Set {
        name: String,
        value: String,
    },
    Reset(Option<String>),
    ShowStatus,
    Prepare {
        name: Vec<u8>,
        inner_start: usize,
    },
    Execute {
        name: Vec<u8>,
    },
    Deallocate(Option<Vec<u8>>),
    DiscardAll,
}

pub fn ident_bytes(t: &Token<'_>) -> Option<Vec<u8>> {
    t.ident().map(sql_name)
}

/// PostgreSQL's NAMEDATALEN - 1: the longest name it stores.
pub const MAX_NAME: usize = 63;

/// A statement or portal name from the protocol as PostgreSQL stores it: its hash tables keep the first
/// NAMEDATALEN - 1 bytes, so `<63 x's>zzz` and `<63 x's>` are one name.
pub fn protocol_name(name: &[u8]) -> Vec<u8> {
    name[..name.len().min(MAX_NAME)].to_vec()
}

/// A name written in SQL as PostgreSQL stores it: its scanner cuts an identifier to at most NAMEDATALEN - 1
/// bytes at a character boundary.
pub fn sql_name(name: String) -> Vec<u8> {
    let mut end = name.len().min(MAX_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.as_bytes()[..end].to_vec()
}

/// Classifies a statement's role from its significant tokens.
pub fn kind_of(tokens: &[Token<'_>]) -> SessionCommand {
    let w = |i: usize, kw: &str| tokens.get(i).is_some_and(|t| t.is_word(kw));
    let exact_stepgate = |i: usize| {
        tokens
            .get(i)
            .is_some_and(|t| t.kind == Kind::Word && t.text == "stepgate")
            && tokens.get(i + 1).is_some_and(|t| t.text == ".")
            && tokens.get(i + 2).is_some_and(|t| t.kind == Kind::Word)
    };
    let setting_name = |i: usize| format!("stepgate.{}", tokens[i + 2].text.to_ascii_lowercase());
    // SET stepgate.<name> = <value> | TO <value>, the value a string in any of PostgreSQL's spellings
    // (`'…'`, `E'…'`, `U&'…'` [UESCAPE '…'], `$tag$…$tag$`), a word or a number.
    let uescape = tokens.len() == 8
        && tokens[6].is_word("uescape")
        && tokens[5].kind == Kind::String
        && tokens[7].kind == Kind::String;
    if w(0, "set")
        && exact_stepgate(1)
        && (tokens.len() == 6 || uescape)
        && (tokens[4].text == "=" || tokens[4].is_word("to"))
    {
        let v = &tokens[5];
        let value = match v.kind {
            Kind::String if uescape => {
                super::tree::string_constant(&format!("{} UESCAPE {}", v.text, tokens[7].text))
            }
            Kind::String if v.text.starts_with('\'') => {
                Some(v.text[1..v.text.len() - 1].replace("''", "'"))
            }
            // Decoded by PostgreSQL's own scanner, as the server would read it.
            Kind::String => super::tree::string_constant(v.text),
            Kind::Word | Kind::Number => Some(v.text.to_string()),
            _ => None,
        };
        if let Some(value) = value {
            return SessionCommand::Set {
                name: setting_name(1),
                value,
            };
        }
        return SessionCommand::Mention;
    }
    if w(0, "reset") && tokens.len() == 2 && w(1, "all") {
        return SessionCommand::Reset(None);
    }
    if w(0, "reset") && exact_stepgate(1) && tokens.len() == 4 {
        return SessionCommand::Reset(Some(setting_name(1)));
    }
    if w(0, "show") && exact_stepgate(1) && tokens.len() == 4 {
        if tokens[3].is_word("status") {
            return SessionCommand::ShowStatus;
        }
        return SessionCommand::Plain;
    }
    if crate::classify::needs_attention(tokens) && mentions(tokens) {
        return SessionCommand::Mention;
    }
    if w(0, "prepare") && tokens.len() > 3 && !w(1, "transaction") {
        if let (Some(name), Some(as_at)) = (
            ident_bytes(&tokens[1]),
            tokens.iter().position(|t| t.is_word("as")),
        ) {
            if as_at + 1 < tokens.len() {
                return SessionCommand::Prepare {
                    name,
                    inner_start: as_at + 1,
                };
            }
        }
        return SessionCommand::Plain;
    }
    if w(0, "execute") && tokens.len() >= 2 {
        if let Some(name) = ident_bytes(&tokens[1]) {
            return SessionCommand::Execute { name };
        }
    }
    if w(0, "deallocate") {
        let i = if w(1, "prepare") { 2 } else { 1 };
        if w(i, "all") && tokens.len() == i + 1 {
            return SessionCommand::Deallocate(None);
        }
        if let Some(name) = tokens.get(i).and_then(ident_bytes) {
            if tokens.len() == i + 1 {
                return SessionCommand::Deallocate(Some(name));
            }
        }
        return SessionCommand::Plain;
    }
    if w(0, "discard") && w(1, "all") && tokens.len() == 2 {
        return SessionCommand::DiscardAll;
    }
    SessionCommand::Plain
}

/// A mention of a stepgate setting anywhere in the statement.
pub fn mentions(tokens: &[Token<'_>]) -> bool {
    tokens.iter().enumerate().any(|(i, t)| {
        (matches!(t.kind, Kind::Word | Kind::QuotedIdent)
            && t.ident()
                .is_some_and(|n| n.eq_ignore_ascii_case("stepgate"))
            && tokens.get(i + 1).is_some_and(|n| n.text == "."))
            || (matches!(t.kind, Kind::String | Kind::QuotedIdent)
                && crate::classify::mentions_stepgate_text(t.text))
    })
}

/// `SHOW stepgate.<name>` exactly as written.
pub fn plain_show_stepgate(tokens: &[Token<'_>]) -> bool {
    tokens.len() == 4
        && tokens[0].is_word("show")
        && tokens[1].kind == Kind::Word
        && tokens[1].text.eq_ignore_ascii_case("stepgate")
        && tokens[2].text == "."
        && tokens[3].kind == Kind::Word
}

/// `… EXECUTE name …` inside another statement (EXPLAIN ANALYZE EXECUTE p, CREATE TABLE … AS EXECUTE p).
pub fn embedded_execute(tokens: &[Token<'_>]) -> Option<Vec<u8>> {
    tokens.windows(2).find_map(|p| {
        (p[0].is_word("execute") && !p[1].is_word("function") && !p[1].is_word("procedure"))
            .then(|| ident_bytes(&p[1]))
            .flatten()
    })
}
