//! The token payload: the text a signer reads before signing, so it shows the SQL.
//!
//! ```text
//! stepgate-token: 1
//! id: 7d4c0a6e-5b1f-4f0e-9a53-2f1e9c0b8d11
//! instance: prod-eu1
//! database: app
//! user: migrator
//! not-after: 2026-11-28T21:00:00Z
//! statement: sha256:9f2c…(64 hex) destructive "DROP TABLE staging_orders"
//! reason: PROJ-142 retire the staging table
//! ```
//!
//! One `key: value` per line, LF or CRLF, no comments. Required: `stepgate-token` (= 1), `id` (a UUID),
//! `database`, `not-after` (RFC 3339, UTC, `Z`), at least one `statement`. Optional: `instance`, `user`,
//! `not-before`, `reason`. Only `statement` repeats. A statement is its fingerprint, its class and its SQL
//! as a JSON string; the parser recomputes the fingerprint from the SQL and rejects a mismatch. Every
//! deviation is an error that names the line.

use std::fmt::Write as _;
use std::time::SystemTime;

use thiserror::Error;

use crate::classify::{lex, split, Class};

/// Largest payload accepted (after any decompression), per DESIGN.md.
pub const MAX_PAYLOAD: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PayloadError {
    #[error("malformed (line {line}): {message}")]
    Line { line: usize, message: String },
    #[error("malformed: missing required field {0}")]
    Missing(&'static str),
    #[error("malformed: payload of {0} bytes exceeds the limit of {MAX_PAYLOAD} bytes")]
    TooLarge(usize),
    #[error("malformed: payload is not UTF-8")]
    NotUtf8,
}

/// One statement a token authorizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementGrant {
    pub fingerprint: String,
    pub class: Class,
    pub sql: String,
}

/// A parsed payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub id: String,
    pub instance: Option<String>,
    pub database: String,
    pub user: Option<String>,
    pub not_before: Option<SystemTime>,
    pub not_after: SystemTime,
    pub statements: Vec<StatementGrant>,
    pub reason: Option<String>,
}

fn line_err(line: usize, message: impl Into<String>) -> PayloadError {
    PayloadError::Line {
        line,
        message: message.into(),
    }
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit() && !c.is_ascii_uppercase(),
        })
}

/// RFC 3339 in UTC with a `Z` suffix.
fn parse_time(line: usize, field: &str, v: &str) -> Result<SystemTime, PayloadError> {
    if !v.ends_with('Z') {
        return Err(line_err(
            line,
            format!("{field} must be RFC 3339 in UTC ending in Z, got {v:?}"),
        ));
    }
    humantime::parse_rfc3339(v)
        .map_err(|e| line_err(line, format!("{field} {v:?} is not an RFC 3339 time: {e}")))
}

fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The fingerprint of `sql` (one statement), as the classifier computes it.
pub fn fingerprint_of(sql: &str) -> Option<String> {
    let tokens = lex::lex(sql, true).ok()?;
    let stmts = split::split(sql, &tokens);
    match stmts.as_slice() {
        [one] => Some(split::fingerprint(&one.tokens)),
        _ => None,
    }
}

fn parse_statement(line: usize, v: &str) -> Result<StatementGrant, PayloadError> {
    let (fp, rest) = v
        .split_once(' ')
        .ok_or_else(|| line_err(line, "statement must be `sha256:<hex> <class> \"<sql>\"`"))?;
    let hex = fp
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        })
        .ok_or_else(|| {
            line_err(
                line,
                format!("{fp:?} is not sha256: and 64 lowercase hex digits"),
            )
        })?;
    let (class, json) = rest
        .split_once(' ')
        .ok_or_else(|| line_err(line, "statement must be `sha256:<hex> <class> \"<sql>\"`"))?;
    let class: Class = class.parse().map_err(|e: String| line_err(line, e))?;
    let sql: String = serde_json::from_str(json).map_err(|e| {
        line_err(
            line,
            format!("the statement text must be one JSON string: {e}"),
        )
    })?;
    let computed = fingerprint_of(&sql)
        .ok_or_else(|| line_err(line, "the statement text must be exactly one statement"))?;
    if computed[7..] != *hex {
        return Err(line_err(
            line,
            format!(
                "fingerprint mismatch: the text's fingerprint is {computed}, the line says {fp}"
            ),
        ));
    }
    Ok(StatementGrant {
        fingerprint: computed,
        class,
        sql,
    })
}

impl Payload {
    /// Parses a payload strictly.
    pub fn parse(bytes: &[u8]) -> Result<Payload, PayloadError> {
        if bytes.len() > MAX_PAYLOAD {
            return Err(PayloadError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| PayloadError::NotUtf8)?;
        let (mut version, mut id, mut instance, mut database, mut user) =
            (None, None, None, None, None);
        let (mut not_before, mut not_after, mut reason) = (None, None, None);
        let mut statements = Vec::new();
        let body = text.strip_suffix('\n').unwrap_or(text);
        for (i, raw) in body.split('\n').enumerate() {
            let n = i + 1;
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            let (key, value) = line
                .split_once(": ")
                .ok_or_else(|| line_err(n, format!("expected `key: value`, got {line:?}")))?;
            if value.is_empty() || value.trim() != value {
                return Err(line_err(
                    n,
                    format!("{key} has an empty value or surrounding spaces"),
                ));
            }
            let once = |slot: &mut Option<(usize, String)>| -> Result<(), PayloadError> {
                if let Some((first, _)) = slot {
                    return Err(line_err(
                        n,
                        format!("{key} repeated (first on line {first})"),
                    ));
                }
                *slot = Some((n, value.to_string()));
                Ok(())
            };
            match key {
                "stepgate-token" => once(&mut version)?,
                "id" => once(&mut id)?,
                "instance" => once(&mut instance)?,
                "database" => once(&mut database)?,
                "user" => once(&mut user)?,
                "not-before" => once(&mut not_before)?,
                "not-after" => once(&mut not_after)?,
                "reason" => once(&mut reason)?,
                "statement" => statements.push(parse_statement(n, value)?),
                other => return Err(line_err(n, format!("unknown field {other:?}"))),
            }
        }
        let (vline, v) = version.ok_or(PayloadError::Missing("stepgate-token"))?;
        if v != "1" {
            return Err(line_err(
                vline,
                format!("stepgate-token must be 1, got {v:?}"),
            ));
        }
        let (idline, id) = id.ok_or(PayloadError::Missing("id"))?;
        if !is_uuid(&id) {
            return Err(line_err(
                idline,
                format!("id {id:?} is not a lowercase UUID"),
            ));
        }
        let (_, database) = database.ok_or(PayloadError::Missing("database"))?;
        let (naline, na) = not_after.ok_or(PayloadError::Missing("not-after"))?;
        let not_after = parse_time(naline, "not-after", &na)?;
        let not_before = match not_before {
            Some((l, v)) => Some(parse_time(l, "not-before", &v)?),
            None => None,
        };
        if let Some(nb) = not_before {
            if nb > not_after {
                return Err(line_err(naline, "not-after is before not-before"));
            }
        }
        if statements.is_empty() {
            return Err(PayloadError::Missing("statement"));
        }
        Ok(Payload {
            id,
            instance: instance.map(|(_, v)| v),
            database,
            user: user.map(|(_, v)| v),
            not_before,
            not_after,
            statements,
            reason: reason.map(|(_, v)| v),
        })
    }

    /// The canonical text of the payload (what `stepgate token new` prints and a signer signs).
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "stepgate-token: 1");
        let _ = writeln!(s, "id: {}", self.id);
        if let Some(i) = &self.instance {
            let _ = writeln!(s, "instance: {i}");
        }
        let _ = writeln!(s, "database: {}", self.database);
        if let Some(u) = &self.user {
            let _ = writeln!(s, "user: {u}");
        }
        if let Some(nb) = self.not_before {
            let _ = writeln!(s, "not-before: {}", format_time(nb));
        }
        let _ = writeln!(s, "not-after: {}", format_time(self.not_after));
        for g in &self.statements {
            let json = serde_json::to_string(&g.sql).unwrap_or_default();
            let _ = writeln!(s, "statement: {} {} {json}", g.fingerprint, g.class);
        }
        if let Some(r) = &self.reason {
            let _ = writeln!(s, "reason: {r}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "7d4c0a6e-5b1f-4f0e-9a53-2f1e9c0b8d11";

    fn good() -> String {
        let fp = fingerprint_of("DROP TABLE staging_orders").unwrap();
        format!(
            "stepgate-token: 1\nid: {ID}\ninstance: prod-eu1\ndatabase: app\nuser: migrator\n\
             not-after: 2026-11-28T21:00:00Z\nstatement: {fp} destructive \"DROP TABLE staging_orders\"\n\
             reason: PROJ-142 retire the staging table\n"
        )
    }

    #[test]
    fn parses_and_renders_the_design_example() {
        let p = Payload::parse(good().as_bytes()).unwrap();
        assert_eq!(p.database, "app");
        assert_eq!(p.user.as_deref(), Some("migrator"));
        assert_eq!(p.statements.len(), 1);
        assert_eq!(p.statements[0].class, Class::Destructive);
        assert_eq!(p.render(), good());
        // CRLF is accepted.
        let crlf = good().replace('\n', "\r\n");
        assert_eq!(Payload::parse(crlf.as_bytes()).unwrap(), p);
    }

    fn err(text: &str) -> String {
        Payload::parse(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn every_deviation_names_its_line() {
        let g = good();
        let cases: Vec<(String, &str)> = vec![
            (g.replace("reason:", "# reason:"), "line 8"),
            (
                g.replace("database: app\n", "database: app\ndatabase: other\n"),
                "line 5",
            ),
            (g.replace("user: migrator", "colour: blue"), "line 5"),
            (
                g.replace("2026-11-28T21:00:00Z", "2026-11-28T21:00:00+01:00"),
                "line 6",
            ),
            (g.replace("2026-11-28T21:00:00Z", "tomorrow"), "line 6"),
            (g.replace(ID, "not-a-uuid"), "line 2"),
            (
                g.replace("stepgate-token: 1", "stepgate-token: 2"),
                "line 1",
            ),
            (g.replace("destructive", "harmless"), "line 7"),
            (
                g.replace("DROP TABLE staging_orders\"", "DROP TABLE orders\""),
                "line 7",
            ),
            (
                g.replace("\"DROP TABLE staging_orders\"", "DROP TABLE staging_orders"),
                "line 7",
            ),
            (g.replace("user: migrator", "user:migrator"), "line 5"),
            (g.replace("user: migrator", "user:  migrator"), "line 5"),
        ];
        for (text, line) in cases {
            let e = err(&text);
            assert!(
                e.contains(line) && e.starts_with("malformed"),
                "{e} (wanted {line}) for:\n{text}"
            );
        }
    }

    #[test]
    fn required_fields() {
        let g = good();
        for (field, without) in [
            ("stepgate-token", g.replace("stepgate-token: 1\n", "")),
            ("id", g.replace(&format!("id: {ID}\n"), "")),
            ("database", g.replace("database: app\n", "")),
            (
                "not-after",
                g.replace("not-after: 2026-11-28T21:00:00Z\n", ""),
            ),
        ] {
            assert!(err(&without).contains(field), "{field}");
        }
        let no_stmt: String = g
            .lines()
            .filter(|l| !l.starts_with("statement"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(err(&no_stmt).contains("statement"));
    }

    #[test]
    fn a_statement_may_be_listed_twice_and_texts_are_exact() {
        let fp = fingerprint_of("DROP TABLE t").unwrap();
        let text = format!(
            "stepgate-token: 1\nid: {ID}\ndatabase: app\nnot-after: 2026-11-28T21:00:00Z\n\
             statement: {fp} destructive \"DROP TABLE t\"\nstatement: {fp} destructive \"drop  table t;\"\n"
        );
        let p = Payload::parse(text.as_bytes()).unwrap();
        assert_eq!(p.statements.len(), 2);
        assert_eq!(p.statements[0].fingerprint, p.statements[1].fingerprint);
        // Two statements in one text are refused.
        let two = text.replace("\"drop  table t;\"", "\"drop table t; select 1\"");
        assert!(err(&two).contains("line 6"));
    }

    #[test]
    fn size_limit() {
        let big = format!("{}reason: {}\n", good(), "x".repeat(MAX_PAYLOAD));
        assert!(matches!(
            Payload::parse(big.as_bytes()),
            Err(PayloadError::TooLarge(_))
        ));
    }
}
