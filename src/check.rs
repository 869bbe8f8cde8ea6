//! `stepgate check`: classify SQL files the way the gate would, for people and CI.
//!
//! Input is a file as psql would run it: meta-command lines (`\set`, `\i`, …) are not SQL and are skipped;
//! `\g`, `\gx`, `\gset` and `\gdesc` end a statement like `;`; `\gexec` ends one and makes it `unparsed`,
//! since it runs whatever the query returns.

use serde::Serialize;

use crate::classify::lex::{self, Kind};
use crate::classify::{decode, Class, Classifier, LexSettings};
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
}

/// Replaces psql meta-commands with blanks (keeping every offset and line), putting a `;` where a
/// `\g`-family command ends a statement. Returns the cleaned text and the offsets of `\gexec` terminators.
pub fn strip_meta_commands(text: &str) -> (String, Vec<usize>) {
    let mut out = text.as_bytes().to_vec();
    let mut gexec = Vec::new();
    let mut pos = 0;
    // Lex incrementally: a backslash outside any literal or comment starts a meta-command running to the
    // end of its line. Lexing errors (unterminated literals) leave the rest as it is.
    while pos < text.len() {
        let Ok(tokens) = lex::lex(&text[pos..], true) else {
            break;
        };
        let Some(bs) = tokens
            .iter()
            .find(|t| t.kind == Kind::Other && t.text == "\\")
        else {
            break;
        };
        let start = pos + bs.start;
        let end = text[start..]
            .find('\n')
            .map(|n| start + n)
            .unwrap_or(text.len());
        let command = text[start + 1..end].split_whitespace().next().unwrap_or("");
        for b in &mut out[start..end] {
            *b = b' ';
        }
        if matches!(command, "g" | "gx" | "gset" | "gdesc" | "gexec") {
            out[start] = b';';
            if command == "gexec" {
                gexec.push(start);
            }
        }
        pos = end;
    }
    // Only ASCII bytes were replaced by ASCII bytes, so the text is still UTF-8.
    (String::from_utf8(out).unwrap_or_default(), gexec)
}

/// Classifies one file's text under `rule`.
pub fn check_text(
    name: &str,
    text: &str,
    config: &Config,
    rule: &Rule,
    classifier: &Classifier,
) -> Vec<Finding> {
    let (clean, gexec) = strip_meta_commands(text);
    let line_of = |offset: usize| clean[..offset].bytes().filter(|&b| b == b'\n').count() + 1;
    let settings = LexSettings::default();
    let finding =
        |index: usize, start: usize, class: Class, fingerprint: String, sql: &str| Finding {
            file: name.to_string(),
            index,
            line: line_of(start),
            class,
            guarded: config.is_guarded(rule, class),
            fingerprint,
            sql: sql.to_string(),
        };
    match classifier.analyze(&clean, &settings) {
        Ok(stmts) => stmts
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let end = s.start + s.text.len();
                // A `\gexec` right after the statement makes it unparsed.
                let runs_results = gexec
                    .iter()
                    .any(|&g| g >= end && clean[end..g].trim().is_empty());
                let class = if runs_results {
                    Class::Unparsed
                } else {
                    s.verdict.class
                };
                finding(i, s.start, class, s.fingerprint(), s.text)
            })
            .collect(),
        Err(_) => {
            // Unreadable (an unterminated literal or comment): one unparsed finding for the whole text.
            let trimmed = clean.trim();
            let start = clean.find(trimmed).unwrap_or(0);
            let tokens = lex::lex(trimmed, true).unwrap_or_default();
            vec![finding(
                0,
                start,
                Class::Unparsed,
                crate::classify::split::fingerprint(&tokens),
                trimmed,
            )]
        }
    }
}

/// Reads a file as UTF-8 (the encoding psql scripts are run in by default).
pub fn read_source(bytes: &[u8]) -> Result<String, String> {
    decode(bytes, &LexSettings::default())
        .map(|c| c.into_owned())
        .map_err(|e| e.to_string())
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
        check_text("m.sql", text, &c, &c.rule_for("app", "u"), &c.classifier())
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
}
