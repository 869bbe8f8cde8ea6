//! Lexical rules for statements sqlparser rejects. They may give a rejected statement a more informative
//! guarded class (DO → privileged, DROP … → destructive, CREATE … → ddl), and may pass it only where the tokens
//! prove a harmless shape. Everything else stays `unparsed`.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::ast::{const_truth, Findings};
use super::class::Class;
use super::lex::{Kind, Token};

/// Words that make a statement only change session state when they lead it.
const SESSION_WORDS: &[&str] = &[
    "set",
    "reset",
    "show",
    "discard",
    "listen",
    "unlisten",
    "notify",
    "deallocate",
    "fetch",
    "close",
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
];

/// The class of a statement from its significant tokens, when the parser rejected it. `sub` classifies an
/// inner statement (for `COPY (…)`, `EXPLAIN ANALYZE …`, `PREPARE … AS …`, `DECLARE … FOR …`).
pub fn classify(
    tokens: &[Token<'_>],
    found: &mut Findings,
    sub: &dyn Fn(&[Token<'_>], &mut Findings) -> Class,
) -> Class {
    let w = |i: usize| {
        tokens
            .get(i)
            .filter(|t| t.kind == Kind::Word)
            .map(|t| t.text.to_ascii_lowercase())
    };
    let Some(first) = w(0) else {
        return Class::Unparsed;
    };
    let has_word = |kw: &str| tokens.iter().any(|t| t.is_word(kw));
    let second = w(1).unwrap_or_default();
    match first.as_str() {
        "do" | "cluster" | "reindex" | "checkpoint" | "load" | "reassign" => Class::Privileged,
        "grant" | "revoke" | "lock" => Class::Privileged,
        "truncate" => Class::Destructive,
        "drop" => match second.as_str() {
            "database" | "role" | "user" | "group" | "owned" => Class::Privileged,
            _ => Class::Destructive,
        },
        "create" | "alter" => {
            let object = if second == "or" {
                w(3).unwrap_or_default()
            } else {
                second.clone()
            };
            let object = if [
                "unique",
                "temp",
                "temporary",
                "unlogged",
                "materialized",
                "recursive",
                "trusted",
                "procedural",
                "default",
            ]
            .contains(&object.as_str())
            {
                // `CREATE UNIQUE INDEX`, `ALTER DEFAULT PRIVILEGES` …: the next word names the object.
                if object == "default" {
                    "default".to_string()
                } else {
                    w(if second == "or" { 4 } else { 2 }).unwrap_or_default()
                }
            } else {
                object
            };
            match object.as_str() {
                "role" | "user" | "group" | "system" | "default" => Class::Privileged,
                "table"
                    if first == "alter"
                        && (has_word("drop") || has_word("detach") || has_word("type")) =>
                {
                    Class::Destructive
                }
                _ => Class::Ddl,
            }
        }
        "comment" | "refresh" | "security" | "import" => Class::Ddl,
        "vacuum" | "analyze" | "analyse" => {
            if has_word("full") {
                Class::Privileged
            } else if vacuum_shape(&tokens[1..]) {
                Class::Session
            } else {
                Class::Unparsed
            }
        }
        "table" => {
            // `TABLE [ONLY] name[.name]` [*]
            let rest: Vec<_> = tokens[1..].iter().filter(|t| !t.is_word("only")).collect();
            let shape_ok = !rest.is_empty()
                && rest.iter().enumerate().all(|(i, t)| {
                    if i % 2 == 0 {
                        matches!(t.kind, Kind::Word | Kind::QuotedIdent)
                    } else {
                        t.kind == Kind::Punct && t.text == "."
                    }
                })
                && rest.len() % 2 == 1;
            if shape_ok {
                Class::Read
            } else {
                Class::Unparsed
            }
        }
        "move" => {
            if tokens[1..].iter().all(|t| {
                matches!(t.kind, Kind::Word | Kind::QuotedIdent | Kind::Number)
                    || (t.kind == Kind::Op && t.text == "-")
            }) {
                Class::Session
            } else {
                Class::Unparsed
            }
        }
        "commit" | "rollback" | "prepare"
            if tokens.len() == 3
                && (second == "prepared" || second == "transaction")
                && tokens[2].kind == Kind::String =>
        {
            Class::Session
        }
        "prepare" => match tokens.iter().position(|t| t.is_word("as")) {
            Some(i) if i + 1 < tokens.len() => sub(&tokens[i + 1..], found).max(Class::Session),
            _ => Class::Unparsed,
        },
        "declare" => match tokens.iter().position(|t| t.is_word("for")) {
            Some(i) if i + 1 < tokens.len() && has_word("cursor") => {
                sub(&tokens[i + 1..], found).max(Class::Session)
            }
            _ => Class::Unparsed,
        },
        "explain" => {
            if !has_word("analyze") && !has_word("analyse") {
                return Class::Read;
            }
            // Skip the option list and option words to the statement.
            let mut i = 1;
            if tokens.get(1).is_some_and(|t| t.text == "(") {
                let mut depth = 0;
                while i < tokens.len() {
                    match tokens[i].text {
                        "(" => depth += 1,
                        ")" => {
                            depth -= 1;
                            if depth == 0 {
                                i += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
                // `(ANALYZE off)`: the decision depends on the literal.
                found.literal_sensitive = true;
            }
            while tokens.get(i).is_some_and(|t| {
                t.is_word("analyze") || t.is_word("analyse") || t.is_word("verbose")
            }) {
                i += 1;
            }
            if i < tokens.len() {
                sub(&tokens[i..], found)
            } else {
                Class::Unparsed
            }
        }
        "copy" => copy_class(tokens, found, sub),
        "select" | "values" => query_class(tokens),
        "with" => {
            if ["insert", "update", "delete", "merge"]
                .iter()
                .any(|k| has_word(k))
            {
                Class::Unparsed
            } else {
                query_class(tokens)
            }
        }
        "insert" => {
            if ["delete", "truncate", "drop", "merge"]
                .iter()
                .any(|k| has_word(k))
            {
                Class::Unparsed
            } else {
                Class::Write
            }
        }
        "update" | "delete" => where_class(tokens, found),
        w if SESSION_WORDS.contains(&w) => {
            if tokens.iter().any(|t| t.kind == Kind::Other) {
                Class::Unparsed
            } else {
                Class::Session
            }
        }
        _ => Class::Unparsed,
    }
}

/// `[ ( option [value] [, …] ) ] [ VERBOSE | ANALYZE | FREEZE … ] [ table [ ( column [, …] ) ] [, …] ]`: the
/// arguments of a VACUUM or ANALYZE that can only name tables and options.
fn vacuum_shape(t: &[Token<'_>]) -> bool {
    let is = |i: usize, s: &str| t.get(i).is_some_and(|x| x.text == s);
    let ident = |i: usize| {
        t.get(i)
            .is_some_and(|x| matches!(x.kind, Kind::Word | Kind::QuotedIdent))
    };
    let mut i = 0;
    if is(0, "(") {
        i = 1;
        loop {
            match t.get(i) {
                Some(x) if x.text == ")" => {
                    i += 1;
                    break;
                }
                Some(x)
                    if matches!(x.kind, Kind::Word | Kind::Number | Kind::String)
                        || x.text == "," =>
                {
                    i += 1
                }
                _ => return false,
            }
        }
    }
    while t.get(i).is_some_and(|x| {
        ["verbose", "analyze", "analyse", "freeze", "skip_locked"]
            .iter()
            .any(|k| x.is_word(k))
    }) {
        i += 1;
    }
    while i < t.len() {
        if !ident(i) {
            return false;
        }
        i += 1;
        while is(i, ".") {
            if !ident(i + 1) {
                return false;
            }
            i += 2;
        }
        if is(i, "(") {
            i += 1;
            while ident(i) {
                i += 1;
                if is(i, ",") {
                    i += 1;
                }
            }
            if !is(i, ")") {
                return false;
            }
            i += 1;
        }
        if i < t.len() {
            if !is(i, ",") {
                return false;
            }
            i += 1;
        }
    }
    true
}

/// A SELECT/VALUES/WITH query sqlparser rejected: a read, a write when it locks rows, ddl when it creates a
/// table (`INTO`).
fn query_class(tokens: &[Token<'_>]) -> Class {
    if tokens.iter().any(|t| t.kind == Kind::Other) {
        return Class::Unparsed;
    }
    if tokens.iter().any(|t| t.is_word("into")) {
        return Class::Ddl;
    }
    let locks = tokens.windows(2).any(|p| {
        p[0].is_word("for")
            && (p[1].is_word("update")
                || p[1].is_word("share")
                || p[1].is_word("no")
                || p[1].is_word("key"))
    });
    if locks {
        Class::Write
    } else {
        Class::Read
    }
}

/// COPY sqlparser rejected (e.g. `WITH (FREEZE ON)`): to/from STDIN/STDOUT is a write, a file or PROGRAM is
/// privileged.
fn copy_class(
    tokens: &[Token<'_>],
    found: &mut Findings,
    sub: &dyn Fn(&[Token<'_>], &mut Findings) -> Class,
) -> Class {
    if tokens.iter().any(|t| t.is_word("program")) {
        return Class::Privileged;
    }
    let mut inner = Class::Write;
    let mut i = 1;
    if tokens.get(1).is_some_and(|t| t.text == "(") {
        let mut depth = 0;
        let start = 2;
        while i < tokens.len() {
            match tokens[i].text {
                "(" => depth += 1,
                ")" => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        if i >= tokens.len() || i <= start {
            return Class::Unparsed;
        }
        inner = sub(&tokens[start..i], found).max(Class::Write);
    }
    let dir = tokens[i..]
        .iter()
        .position(|t| t.is_word("from") || t.is_word("to"));
    match dir.and_then(|d| tokens.get(i + d + 1)) {
        Some(t) if t.is_word("stdin") || t.is_word("stdout") => inner,
        Some(t) if t.kind == Kind::String => Class::Privileged,
        _ => Class::Unparsed,
    }
}

/// UPDATE/DELETE sqlparser rejected (e.g. `SET a[$1] = $2`): the top-level WHERE clause is parsed on its own;
/// without one, or when it is constant true, the statement is destructive.
fn where_class(tokens: &[Token<'_>], found: &mut Findings) -> Class {
    if tokens.iter().any(|t| t.kind == Kind::Other) {
        return Class::Unparsed;
    }
    let mut depth = 0;
    let mut where_at = None;
    let mut end = tokens.len();
    for (i, t) in tokens.iter().enumerate() {
        match t.text {
            "(" | "[" => depth += 1,
            ")" | "]" => depth -= 1,
            _ => {}
        }
        if depth == 0 && t.is_word("where") && where_at.is_none() {
            where_at = Some(i);
        }
        if depth == 0 && t.is_word("returning") && where_at.is_some() {
            end = i;
            break;
        }
        if depth == 0 && t.is_word("current") && where_at == Some(i.wrapping_sub(1)) {
            // WHERE CURRENT OF cursor: one row.
            return Class::Write;
        }
    }
    let Some(w) = where_at else {
        return Class::Destructive;
    };
    if w + 1 >= end {
        return Class::Unparsed;
    }
    let first = tokens[w + 1].start;
    let last = &tokens[end - 1];
    // Reassemble the WHERE text from the tokens' source positions.
    let source_end = last.start + last.text.len();
    let text = source_slice(tokens, first, source_end);
    let dialect = PostgreSqlDialect {};
    let expr = Parser::new(&dialect)
        .try_with_sql(&text)
        .and_then(|mut p| p.parse_expr());
    match expr {
        Ok(e) => {
            if const_truth(&e, found) == Some(true) {
                Class::Destructive
            } else {
                Class::Write
            }
        }
        Err(_) => Class::Unparsed,
    }
}

/// The text between two byte offsets, rebuilt from tokens (they all borrow from one source string).
fn source_slice(tokens: &[Token<'_>], from: usize, to: usize) -> String {
    let mut out = String::new();
    let mut pos = from;
    for t in tokens.iter().filter(|t| t.start >= from && t.start < to) {
        if t.start > pos {
            out.push(' ');
        }
        out.push_str(t.text);
        pos = t.start + t.text.len();
    }
    out
}
