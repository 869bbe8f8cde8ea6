//! `stepgate check`: classify SQL files the way the gate would, for people and CI.
//!
//! Input is a file as psql would run it, split where psql sends a query string to the server: at a `;`
//! outside parentheses and outside a `BEGIN … END` body (psql's own counting: a BEGIN or CASE that is not the
//! statement's first word opens one, END closes it), and at a meta-command that executes the query buffer
//! (`\g`, `\gx`, `\gset`, `\gdesc`, `\gexec`, `\crosstabview`, `\watch`; `\bind … \g` ends at its `\g`).
//! `\;` puts a `;` into the buffer without sending. Other meta-command lines (`\set`, `\echo`, …) are not
//! SQL. `\gexec` makes its statement `unparsed`, since it runs whatever the query returns; `\i`, `\ir` and
//! `\include*` run a file check cannot see from here, so they are `unparsed` findings too. After a
//! `COPY … FROM STDIN` is sent, the lines up to `\.` are data, not SQL. Each query string is then judged by
//! PostgreSQL's parser and the classifier, statement by statement, exactly as the gate judges it.

use serde::Serialize;

use crate::classify::lex::{self, Kind};
use crate::classify::{decode, tree, Class, Classifier, LexSettings};
use crate::config::{Config, Rule};

/// One statement of a checked file (the JSON Lines object of `--format json`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub file: String,
    /// Counts non-empty statements in the file from 0.
    pub index: usize,
    /// 1-based line of the statement's first token.
    pub line: usize,
    pub class: Class,
    pub guarded: bool,
    pub fingerprint: String,
    /// From the first to the last token, without the `;`.
    pub sql: String,
    /// The rule that gave the class (`DELETE without WHERE`, `calls pg_read_file`,
    /// `PostgreSQL: syntax error at or near "x"`).
    pub reason: String,
}

/// One query string as psql sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Byte offset of `text` in the file.
    pub start: usize,
    pub text: String,
    /// Why it is `unparsed` whatever it says (`\gexec`, an included file).
    pub forced: Option<&'static str>,
}

/// Meta-commands that send the query buffer to the server.
const EXECUTING: &[&str] = &["g", "gx", "gset", "gdesc", "gexec", "crosstabview", "watch"];
/// Meta-commands that run another file's SQL.
const INCLUDING: &[&str] = &["i", "ir", "include", "include_relative"];

/// Splits a psql script into the query strings psql would send (see the module docs).
pub fn split_psql(text: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    // The query buffer: kept as the original bytes with meta-commands blanked, so offsets stay those of
    // the file.
    let mut buf_start: Option<usize> = None;
    let mut buf = String::new();
    let mut pos = 0;
    let mut paren = 0i32;
    let mut begin_depth = 0i32;
    let mut identifiers = 0usize;
    let push_to = |buf: &mut String, buf_start: &mut Option<usize>, from: usize, part: &str| {
        if buf_start.is_none() {
            if part.trim().is_empty() {
                return;
            }
            *buf_start = Some(from);
        }
        buf.push_str(part);
    };
    'outer: while pos < text.len() {
        let rest = &text[pos..];
        let tokens = match lex::lex(rest, true) {
            Ok(t) => t,
            Err(_) => {
                // An unterminated literal or comment: psql sends what it has at the end of the file.
                push_to(&mut buf, &mut buf_start, pos, rest);
                break;
            }
        };
        for t in &tokens {
            match t.kind {
                Kind::Punct if t.text == "(" => paren += 1,
                Kind::Punct if t.text == ")" => paren = (paren - 1).max(0),
                Kind::Word => {
                    identifiers += 1;
                    let w = t.text.to_ascii_lowercase();
                    if (w == "begin" || w == "case") && identifiers > 1 {
                        begin_depth += 1;
                    } else if w == "end" && begin_depth > 0 {
                        begin_depth -= 1;
                    }
                }
                Kind::Semicolon if paren == 0 && begin_depth == 0 => {
                    let end = t.start + 1;
                    push_to(&mut buf, &mut buf_start, pos, &rest[..end]);
                    let sent = send(&mut pieces, &mut buf, &mut buf_start, None);
                    identifiers = 0;
                    pos += end;
                    if sent.as_deref().is_some_and(is_copy_from_stdin) {
                        pos = skip_copy_data(text, pos);
                    }
                    continue 'outer;
                }
                Kind::Other if t.text == "\\" => {
                    let at = pos + t.start;
                    push_to(&mut buf, &mut buf_start, pos, &rest[..t.start]);
                    let line_end = text[at..].find('\n').map(|n| at + n).unwrap_or(text.len());
                    if text[at..].starts_with("\\;") {
                        // A `;` in the buffer that does not send it.
                        push_to(&mut buf, &mut buf_start, at, " ;");
                        pos = at + 2;
                        continue 'outer;
                    }
                    let commands = meta_commands(&text[at..line_end]);
                    let mut sent = None;
                    for c in &commands {
                        if INCLUDING.contains(&c.as_str()) {
                            send(&mut pieces, &mut buf, &mut buf_start, None);
                            pieces.push(Piece {
                                start: at,
                                text: text[at..line_end].trim().to_string(),
                                forced: Some("psql runs another file here; check that file too"),
                            });
                        } else if EXECUTING.contains(&c.as_str()) {
                            let forced = (c == "gexec")
                                .then_some("\\gexec runs whatever the query returns as SQL");
                            sent = send(&mut pieces, &mut buf, &mut buf_start, forced).or(sent);
                            identifiers = 0;
                            paren = 0;
                            begin_depth = 0;
                        }
                    }
                    pos = line_end;
                    if sent.as_deref().is_some_and(is_copy_from_stdin) {
                        pos = skip_copy_data(text, pos);
                    }
                    continue 'outer;
                }
                _ => {}
            }
        }
        push_to(&mut buf, &mut buf_start, pos, rest);
        break;
    }
    send(&mut pieces, &mut buf, &mut buf_start, None);
    pieces
}

/// Ends the query buffer as one piece; returns its text.
fn send(
    pieces: &mut Vec<Piece>,
    buf: &mut String,
    buf_start: &mut Option<usize>,
    forced: Option<&'static str>,
) -> Option<String> {
    let start = buf_start.take()?;
    let text = std::mem::take(buf);
    if text.trim().is_empty() {
        return None;
    }
    pieces.push(Piece {
        start,
        text: text.clone(),
        forced,
    });
    Some(text)
}

/// The names of the meta-commands on one line (from a backslash to the end of the line): each unquoted
/// backslash that follows whitespace starts another (`\bind 1 2 \g`).
fn meta_commands(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut quote = None;
    let mut prev_space = true;
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '`' || c == '"' => quote = Some(c),
            None if c == '\\' && (prev_space || i == 0) => {
                let name: String = chars[i + 1..]
                    .iter()
                    .take_while(|c| !c.is_whitespace() && **c != '\\')
                    .collect();
                i += name.chars().count();
                out.push(name);
            }
            None => {}
        }
        prev_space = c.is_whitespace();
        i += 1;
    }
    out
}

fn is_copy_from_stdin(sql: &str) -> bool {
    let Ok(stmts) = tree::parse(sql.trim_end_matches(';'), true) else {
        return false;
    };
    stmts.iter().any(|(_, _, t)| {
        t.get("node")
            .and_then(|n| n.get("CopyStmt"))
            .is_some_and(|c| {
                c.get("is_from").and_then(|v| v.as_bool()) == Some(true)
                    && c.get("filename")
                        .and_then(|v| v.as_str())
                        .is_none_or(|f| f.is_empty())
                    && c.get("is_program").and_then(|v| v.as_bool()) != Some(true)
            })
    })
}

/// Skips COPY data after `pos` (the end of the COPY statement): the rest of its line, then whole lines up
/// to and including one that is `\.`.
fn skip_copy_data(text: &str, pos: usize) -> usize {
    let mut at = text[pos..]
        .find('\n')
        .map(|n| pos + n + 1)
        .unwrap_or(text.len());
    while at < text.len() {
        let end = text[at..].find('\n').map(|n| at + n).unwrap_or(text.len());
        let line = text[at..end].trim_end_matches('\r');
        at = (end + 1).min(text.len());
        if line == "\\." {
            break;
        }
    }
    at
}

/// Classifies one file's text under `rule`.
pub fn check_text(
    name: &str,
    text: &str,
    config: &Config,
    rule: &Rule,
    classifier: &Classifier,
) -> Vec<Finding> {
    let line_of = |offset: usize| {
        text[..offset.min(text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    };
    let settings = LexSettings::default();
    let mut out = Vec::new();
    for piece in split_psql(text) {
        let mut finding =
            |start: usize, class: Class, fingerprint: String, sql: &str, reason: String| {
                out.push(Finding {
                    file: name.to_string(),
                    index: 0,
                    line: line_of(start),
                    class,
                    guarded: config.is_guarded(rule, class),
                    fingerprint,
                    sql: sql.to_string(),
                    reason,
                })
            };
        match classifier.analyze(&piece.text, &settings) {
            Ok(stmts) => {
                let last = stmts.len().saturating_sub(1);
                for (i, s) in stmts.iter().enumerate() {
                    let (class, reason) = match piece.forced {
                        Some(why) if i == last => (Class::Unparsed, why.to_string()),
                        _ => (s.verdict.class, s.reason.clone()),
                    };
                    finding(
                        piece.start + s.start,
                        class,
                        s.fingerprint(),
                        s.text,
                        reason,
                    );
                }
            }
            Err(e) => {
                let trimmed = piece.text.trim().trim_end_matches(';').trim_end();
                let lead = piece.text.len() - piece.text.trim_start().len();
                let tokens = lex::lex(trimmed, true).unwrap_or_default();
                finding(
                    piece.start + lead,
                    Class::Unparsed,
                    crate::classify::split::fingerprint(&tokens),
                    trimmed,
                    match piece.forced {
                        Some(why) => why.to_string(),
                        None => format!("unreadable: {e}"),
                    },
                );
            }
        }
    }
    for (i, f) in out.iter_mut().enumerate() {
        f.index = i;
    }
    out
}

/// Reads a file as UTF-8 (the encoding psql scripts are run in by default).
pub fn read_source(bytes: &[u8]) -> Result<String, crate::classify::ReadError> {
    decode(bytes, &LexSettings::default()).map(|c| c.into_owned())
}

/// The first line of a statement, shortened for the text table.
pub fn first_line(sql: &str, width: usize) -> String {
    let line = sql.lines().next().unwrap_or("");
    let more = sql.contains('\n');
    if line.chars().count() > width {
        format!("{}…", line.chars().take(width).collect::<String>())
    } else if more {
        format!("{line} …")
    } else {
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Vec<Finding> {
        let c = Config::default();
        check_text(
            "m.sql",
            text,
            &c,
            &c.rule_for("app", "u"),
            &crate::classify::Classifier::for_config(&c),
        )
    }

    fn classes(text: &str) -> Vec<(Class, String)> {
        check(text).into_iter().map(|f| (f.class, f.sql)).collect()
    }

    #[test]
    fn lines_indexes_and_meta_commands() {
        let f = check("\\set ON_ERROR_STOP on\n-- header\nCREATE TABLE t (id int);\n\n  select 1;\n\\echo done\nDROP TABLE t");
        assert_eq!(f.len(), 3);
        assert_eq!((f[0].index, f[0].line, f[0].class), (0, 3, Class::Ddl));
        assert_eq!(
            (f[1].index, f[1].line, f[1].class, f[1].guarded),
            (1, 5, Class::Read, false)
        );
        assert_eq!(
            (f[2].line, f[2].sql.as_str(), f[2].guarded),
            (7, "DROP TABLE t", true)
        );
        assert_eq!(f[2].reason, "DROP");
    }

    #[test]
    fn gexec_makes_its_statement_unparsed() {
        let f =
            check("SELECT format('DROP TABLE %I', tablename) FROM pg_tables\n\\gexec\nselect 1;");
        assert_eq!(f[0].class, Class::Unparsed);
        assert!(f[0].guarded);
        assert_eq!(f[1].class, Class::Read);
    }

    #[test]
    fn backslash_inside_a_literal_is_not_a_meta_command() {
        let f = check("select E'a\\\\gexec';");
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].class, Class::Read);
    }

    #[test]
    fn meta_commands_end_statements_as_psql_does() {
        for script in [
            "SELECT 1\\; DROP TABLE t;",
            "SELECT 1 \\crosstabview\nDROP TABLE t;",
            "SELECT 1 \\watch 1\nDROP TABLE t;",
            "SELECT $1 \\bind 5 \\g\nDROP TABLE t;",
            "SELECT 1 \\g\nDROP TABLE t;",
            "SELECT 1 \\gx\nDROP TABLE t;",
            "SELECT 1 AS x \\gset\nDROP TABLE t;",
            "SELECT 1 \\gdesc\nDROP TABLE t;",
        ] {
            let got = classes(script);
            assert!(
                got.iter()
                    .any(|(c, sql)| *c == Class::Destructive && sql == "DROP TABLE t"),
                "{script:?}: {got:?}"
            );
            assert!(
                got.iter().all(|(c, _)| *c != Class::Read || got.len() == 2),
                "{got:?}"
            );
        }
    }

    #[test]
    fn begin_counting_is_psqls() {
        // psql does not split inside what it counts as a BEGIN … END body; the server then splits the
        // string, and every statement is judged.
        let got = classes("SELECT begin atomic FROM (SELECT 1 AS begin) s; DROP TABLE t;");
        assert!(
            got.contains(&(Class::Destructive, "DROP TABLE t".into())),
            "{got:?}"
        );
        let got = classes("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END;\nDROP TABLE t;");
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, Class::Ddl);
        assert_eq!(got[1].0, Class::Destructive);
    }

    #[test]
    fn copy_data_is_not_sql() {
        let got = classes("COPY t FROM stdin;\n1\tDROP TABLE x;\n2\n\\.\nDROP TABLE t;\n");
        assert_eq!(
            got,
            vec![
                (Class::Write, "COPY t FROM stdin".into()),
                (Class::Destructive, "DROP TABLE t".into())
            ]
        );
    }

    #[test]
    fn included_files_and_parse_errors_are_unparsed_with_a_reason() {
        let f = check("\\i other.sql\nSELEC 1;");
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].class, Class::Unparsed);
        assert!(f[0].reason.contains("another file"), "{f:?}");
        assert_eq!(f[1].class, Class::Unparsed);
        assert!(
            f[1].reason
                .starts_with("PostgreSQL: syntax error at or near"),
            "{f:?}"
        );
    }
}
