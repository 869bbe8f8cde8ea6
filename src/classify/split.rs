//! Splitting a query string into statements, and statement fingerprints.
//!
//! Statements end at top-level semicolons only: never inside literals, comments, parentheses or brackets,
//! and (as psql does) not inside a `BEGIN ATOMIC … END` function body.

use sha2::{Digest, Sha256};

use super::lex::{Kind, Token};

/// One statement of a query string.
#[derive(Debug, Clone)]
pub struct Statement<'a> {
    /// From its first to its last significant token, without the `;`.
    pub text: &'a str,
    /// Byte offset of `text` in the query string.
    pub start: usize,
    /// Its significant tokens.
    pub tokens: Vec<Token<'a>>,
}

/// Splits the tokens of `sql` into non-empty statements.
pub fn split<'a>(sql: &'a str, tokens: &[Token<'a>]) -> Vec<Statement<'a>> {
    let mut out = Vec::new();
    let mut current: Vec<Token<'a>> = Vec::new();
    let mut depth = 0i32;
    let mut atomic = 0i32;
    let finish = |current: &mut Vec<Token<'a>>, out: &mut Vec<Statement<'a>>| {
        if let (Some(first), Some(last)) = (current.first(), current.last()) {
            let start = first.start;
            let end = last.start + last.text.len();
            out.push(Statement {
                text: &sql[start..end],
                start,
                tokens: std::mem::take(current),
            });
        }
    };
    for t in tokens {
        if t.is_trivia() {
            continue;
        }
        match t.kind {
            Kind::Punct if t.text == "(" || t.text == "[" => depth += 1,
            Kind::Punct if t.text == ")" || t.text == "]" => depth -= 1,
            Kind::Semicolon if depth <= 0 && atomic <= 0 => {
                finish(&mut current, &mut out);
                depth = 0;
                continue;
            }
            Kind::Word => {
                let opens_body =
                    t.is_word("atomic") && current.last().is_some_and(|p| p.is_word("begin"));
                if opens_body || (atomic > 0 && t.is_word("case")) {
                    atomic += 1;
                } else if atomic > 0 && t.is_word("end") {
                    // SQL-standard bodies have no END IF/END LOOP: END closes a CASE or the body.
                    atomic -= 1;
                }
            }
            _ => {}
        }
        current.push(*t);
    }
    finish(&mut current, &mut out);
    out
}

/// The normalized text a fingerprint is computed from: significant tokens joined by one space, unquoted
/// words lower-cased, everything else as written.
pub fn normalized(tokens: &[Token<'_>]) -> String {
    let mut s = String::with_capacity(tokens.iter().map(|t| t.text.len() + 1).sum());
    for t in tokens
        .iter()
        .filter(|t| !t.is_trivia() && t.kind != Kind::Semicolon)
    {
        if !s.is_empty() {
            s.push(' ');
        }
        if t.kind == Kind::Word {
            s.extend(t.text.chars().map(|c| c.to_ascii_lowercase()));
        } else {
            s.push_str(t.text);
        }
    }
    s
}

/// `sha256:` + 64 lowercase hex digits of the normalized statement (DESIGN.md "Statement fingerprints").
pub fn fingerprint(tokens: &[Token<'_>]) -> String {
    let digest = Sha256::digest(normalized(tokens).as_bytes());
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for byte in digest {
        out.push(HEX[(byte >> 4) as usize] as char);
        out.push(HEX[(byte & 15) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::lex::lex;
    use super::*;

    fn texts(sql: &str) -> Vec<String> {
        let toks = lex(sql, true).unwrap();
        split(sql, &toks)
            .into_iter()
            .map(|s| s.text.to_string())
            .collect()
    }

    #[test]
    fn splits_only_at_top_level() {
        assert_eq!(
            texts("select ';'; select (1;2) ; ; -- x;\n select $$;$$ /* ; */;"),
            vec!["select ';'", "select (1;2)", "select $$;$$"]
        );
    }

    #[test]
    fn begin_atomic_bodies_stay_whole() {
        let sql = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 2 END; END; SELECT 3";
        let got = texts(sql);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].ends_with("END"));
    }

    #[test]
    fn fingerprint_ignores_layout_but_not_names_or_literals() {
        let fp = |s: &str| fingerprint(&lex(s, true).unwrap());
        assert_eq!(fp("DROP TABLE orders"), fp("drop   table /* c */ orders;"));
        assert_ne!(fp("DROP TABLE orders"), fp("DROP TABLE \"orders\""));
        assert_ne!(fp("DROP TABLE orders"), fp("DROP TABLE staging_orders"));
        assert_ne!(fp("select 'x'"), fp("select $$x$$"));
        assert_ne!(fp("select 'x'"), fp("select 'X'"));
        assert_eq!(fp("select 1").len(), 71);
    }
}
