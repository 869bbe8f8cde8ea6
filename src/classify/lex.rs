//! A PostgreSQL-faithful tokenizer: what is a comment, a string, a quoted identifier or a dollar-quoted body
//! is decided exactly as the server's lexer decides it, so splitting, fingerprints and cache keys can never
//! be fooled by a semicolon or keyword hidden in a literal.
//!
//! It honours `standard_conforming_strings`: when it is off, a backslash escapes the next character in a
//! plain `'…'` literal, as it does on the server.

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Keyword or unquoted identifier.
    Word,
    /// `"…"` or `U&"…"`.
    QuotedIdent,
    /// `'…'`, `E'…'`, `B'…'`, `X'…'`, `N'…'`, `U&'…'` or `$tag$…$tag$`.
    String,
    Number,
    /// `$1`.
    Param,
    /// Operator characters (`=`, `<>`, `||`, `::` …).
    Op,
    /// `(`, `)`, `[`, `]`, `,`, `.`, `:`.
    Punct,
    Semicolon,
    Whitespace,
    Comment,
    /// A byte sequence PostgreSQL would reject outside literals (e.g. a stray backslash).
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token<'a> {
    pub kind: Kind,
    pub text: &'a str,
    /// Byte offset in the input.
    pub start: usize,
}

impl Token<'_> {
    pub fn is_trivia(&self) -> bool {
        matches!(self.kind, Kind::Whitespace | Kind::Comment)
    }

    /// True for an unquoted word equal to `kw` (ASCII case-insensitive).
    pub fn is_word(&self, kw: &str) -> bool {
        self.kind == Kind::Word && self.text.eq_ignore_ascii_case(kw)
    }

    /// The identifier this token names, case-folded as PostgreSQL folds it (quoted identifiers as written,
    /// without quotes); None for other kinds.
    pub fn ident(&self) -> Option<String> {
        match self.kind {
            Kind::Word => Some(self.text.to_ascii_lowercase()),
            Kind::QuotedIdent if self.text.starts_with('"') => {
                Some(self.text[1..self.text.len() - 1].replace("\"\"", "\""))
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LexError {
    #[error("unterminated quoted string at byte {0}")]
    UnterminatedString(usize),
    #[error("unterminated quoted identifier at byte {0}")]
    UnterminatedIdent(usize),
    #[error("unterminated /* comment at byte {0}")]
    UnterminatedComment(usize),
    #[error("unterminated dollar-quoted string at byte {0}")]
    UnterminatedDollar(usize),
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || !c.is_ascii()
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$' || !c.is_ascii()
}

fn is_op_byte(c: u8) -> bool {
    matches!(
        c,
        b'+' | b'-'
            | b'*'
            | b'/'
            | b'<'
            | b'>'
            | b'='
            | b'~'
            | b'!'
            | b'@'
            | b'#'
            | b'%'
            | b'^'
            | b'&'
            | b'|'
            | b'`'
            | b'?'
    )
}

/// [`is_ident_char`] for one byte of UTF-8: every byte of a non-ASCII character is at least 0x80, and every
/// non-ASCII character continues an identifier, so a byte loop stops where the char loop would.
fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// Tokenizes `sql`. Whitespace and comments are kept as tokens so callers can recover positions.
pub fn lex(sql: &str, standard_conforming_strings: bool) -> Result<Vec<Token<'_>>, LexError> {
    let mut out = Vec::with_capacity(sql.len() / 4 + 4);
    lex_each(sql, standard_conforming_strings, |t| out.push(t))?;
    Ok(out)
}

/// [`lex`] without collecting: `each` sees every token in order (the cache's shape key needs no vector).
pub fn lex_each<'a>(
    sql: &'a str,
    standard_conforming_strings: bool,
    mut each: impl FnMut(Token<'a>),
) -> Result<(), LexError> {
    let b = sql.as_bytes();
    let mut i = 0;
    let n = b.len();
    let peek = |j: usize| -> u8 {
        if j < n {
            b[j]
        } else {
            0
        }
    };
    while i < n {
        let start = i;
        let c = b[i];
        let kind;
        if is_space(c as char) {
            while i < n && is_space(b[i] as char) {
                i += 1;
            }
            kind = Kind::Whitespace;
        } else if c == b'-' && peek(i + 1) == b'-' {
            while i < n && b[i] != b'\n' && b[i] != b'\r' {
                i += 1;
            }
            kind = Kind::Comment;
        } else if c == b'/' && peek(i + 1) == b'*' {
            let mut depth = 0usize;
            loop {
                if i >= n {
                    return Err(LexError::UnterminatedComment(start));
                }
                if b[i] == b'/' && peek(i + 1) == b'*' {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && peek(i + 1) == b'/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            kind = Kind::Comment;
        } else if c == b'\'' {
            i = string_end(b, i, !standard_conforming_strings)
                .ok_or(LexError::UnterminatedString(start))?;
            kind = Kind::String;
        } else if matches!(c, b'e' | b'E') && peek(i + 1) == b'\'' {
            i = string_end(b, i + 1, true).ok_or(LexError::UnterminatedString(start))?;
            kind = Kind::String;
        } else if matches!(c, b'b' | b'B' | b'x' | b'X' | b'n' | b'N') && peek(i + 1) == b'\'' {
            i = string_end(
                b,
                i + 1,
                !standard_conforming_strings && matches!(c, b'n' | b'N'),
            )
            .ok_or(LexError::UnterminatedString(start))?;
            kind = Kind::String;
        } else if matches!(c, b'u' | b'U') && peek(i + 1) == b'&' && peek(i + 2) == b'\'' {
            i = string_end(b, i + 2, false).ok_or(LexError::UnterminatedString(start))?;
            kind = Kind::String;
        } else if matches!(c, b'u' | b'U') && peek(i + 1) == b'&' && peek(i + 2) == b'"' {
            i = ident_end(b, i + 2).ok_or(LexError::UnterminatedIdent(start))?;
            kind = Kind::QuotedIdent;
        } else if c == b'"' {
            i = ident_end(b, i).ok_or(LexError::UnterminatedIdent(start))?;
            kind = Kind::QuotedIdent;
        } else if c == b'$' && peek(i + 1).is_ascii_digit() {
            i += 1;
            while i < n && b[i].is_ascii_digit() {
                i += 1;
            }
            kind = Kind::Param;
        } else if c == b'$' {
            match dollar_tag_len(sql, i) {
                Some(tag_len) => {
                    let tag = &sql[i..i + tag_len];
                    let body = i + tag_len;
                    match sql[body..].find(tag) {
                        Some(off) => i = body + off + tag_len,
                        None => return Err(LexError::UnterminatedDollar(start)),
                    }
                    kind = Kind::String;
                }
                None => {
                    i += 1;
                    kind = Kind::Other;
                }
            }
        } else if c.is_ascii_digit() || (c == b'.' && peek(i + 1).is_ascii_digit()) {
            i = number_end(b, i);
            kind = Kind::Number;
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            // is_ident_start: `i` is at a character boundary, so a byte from 0x80 starts a non-ASCII one.
            i += 1;
            while i < n && is_ident_byte(b[i]) {
                i += 1;
            }
            kind = Kind::Word;
        } else if c == b';' {
            i += 1;
            kind = Kind::Semicolon;
        } else if c == b':' && peek(i + 1) == b':' {
            i += 2;
            kind = Kind::Op;
        } else if matches!(c, b'(' | b')' | b'[' | b']' | b',' | b'.' | b':') {
            i += 1;
            kind = Kind::Punct;
        } else if is_op_byte(c) {
            while i < n && is_op_byte(b[i]) {
                // A comment start ends the operator, as in PostgreSQL.
                if i > start
                    && ((b[i] == b'-' && peek(i + 1) == b'-')
                        || (b[i] == b'/' && peek(i + 1) == b'*'))
                {
                    break;
                }
                i += 1;
            }
            kind = Kind::Op;
        } else {
            i += sql[i..].chars().next().map(char::len_utf8).unwrap_or(1);
            kind = Kind::Other;
        }
        each(Token {
            kind,
            text: &sql[start..i],
            start,
        });
    }
    Ok(())
}

/// End (exclusive) of a `'…'` literal whose opening quote is at `q`.
fn string_end(b: &[u8], q: usize, backslash_escapes: bool) -> Option<usize> {
    let mut i = q + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if backslash_escapes => i += 2,
            b'\'' if i + 1 < b.len() && b[i + 1] == b'\'' => i += 2,
            b'\'' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// End (exclusive) of a `"…"` identifier whose opening quote is at `q`.
fn ident_end(b: &[u8], q: usize) -> Option<usize> {
    let mut i = q + 1;
    while i < b.len() {
        if b[i] == b'"' {
            if i + 1 < b.len() && b[i + 1] == b'"' {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

/// Length of a `$tag$` opener at `i`, if there is one.
fn dollar_tag_len(sql: &str, i: usize) -> Option<usize> {
    let rest = &sql[i + 1..];
    let mut len = 0;
    for (k, ch) in rest.char_indices() {
        if ch == '$' {
            return Some(k + 2);
        }
        let ok = if k == 0 {
            is_ident_start(ch)
        } else {
            is_ident_char(ch) && ch != '$'
        };
        if !ok {
            return None;
        }
        len = k;
    }
    let _ = len;
    None
}

fn number_end(b: &[u8], mut i: usize) -> usize {
    let n = b.len();
    if b[i] == b'0' && i + 1 < n && matches!(b[i + 1], b'x' | b'X' | b'o' | b'O' | b'b' | b'B') {
        i += 2;
        while i < n && (b[i].is_ascii_hexdigit() || b[i] == b'_') {
            i += 1;
        }
        return i;
    }
    while i < n && (b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    if i < n && b[i] == b'.' && !(i + 1 < n && b[i + 1] == b'.') {
        i += 1;
        while i < n && (b[i].is_ascii_digit() || b[i] == b'_') {
            i += 1;
        }
    }
    if i < n && matches!(b[i], b'e' | b'E') {
        let mut j = i + 1;
        if j < n && matches!(b[j], b'+' | b'-') {
            j += 1;
        }
        if j < n && b[j].is_ascii_digit() {
            i = j;
            while i < n && b[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
    i
}

/// The significant tokens (no whitespace or comments).
pub fn significant<'a>(tokens: &[Token<'a>]) -> Vec<Token<'a>> {
    tokens.iter().filter(|t| !t.is_trivia()).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Vec<(Kind, &str)> {
        lex(sql, true)
            .unwrap()
            .into_iter()
            .filter(|t| !t.is_trivia())
            .map(|t| (t.kind, t.text))
            .collect()
    }

    #[test]
    fn literals_hide_their_contents() {
        assert_eq!(
            kinds("select 'a;b', E'x\\';y', $$ ; $$, $t$ $$ ; $t$, \"we;ird\", U&\"d\\0061\""),
            vec![
                (Kind::Word, "select"),
                (Kind::String, "'a;b'"),
                (Kind::Punct, ","),
                (Kind::String, "E'x\\';y'"),
                (Kind::Punct, ","),
                (Kind::String, "$$ ; $$"),
                (Kind::Punct, ","),
                (Kind::String, "$t$ $$ ; $t$"),
                (Kind::Punct, ","),
                (Kind::QuotedIdent, "\"we;ird\""),
                (Kind::Punct, ","),
                (Kind::QuotedIdent, "U&\"d\\0061\""),
            ]
        );
    }

    #[test]
    fn nested_comments_and_operators() {
        assert_eq!(
            kinds("a /* x /* y */ ; */ >=-- c\n b::int $1 1.5e3 .5"),
            vec![
                (Kind::Word, "a"),
                (Kind::Op, ">="),
                (Kind::Word, "b"),
                (Kind::Op, "::"),
                (Kind::Word, "int"),
                (Kind::Param, "$1"),
                (Kind::Number, "1.5e3"),
                (Kind::Number, ".5"),
            ]
        );
    }

    #[test]
    fn standard_conforming_strings_changes_backslash() {
        let sql = "select 'a\\'; drop table t; --'";
        assert_eq!(kinds(sql).len(), 7); // select 'a\' ; drop table t ; (then a comment): the literal ends early
        let off = lex(sql, false).unwrap();
        let sig: Vec<_> = off.iter().filter(|t| !t.is_trivia()).collect();
        assert_eq!(sig.len(), 2, "{sig:?}"); // select, one literal that swallows the rest
    }

    #[test]
    fn unterminated_is_an_error() {
        assert!(lex("select 'abc", true).is_err());
        assert!(lex("select /* abc", true).is_err());
        assert!(lex("select $$abc", true).is_err());
        assert!(lex("select \"abc", true).is_err());
    }

    #[test]
    fn dollar_in_identifiers_is_not_a_quote() {
        assert_eq!(
            kinds("select a$b"),
            vec![(Kind::Word, "select"), (Kind::Word, "a$b")]
        );
    }

    #[test]
    fn non_ascii_identifiers_and_operators_end_where_postgresql_ends_them() {
        assert_eq!(
            kinds("select café_日本$1+ñ from ß;"),
            vec![
                (Kind::Word, "select"),
                (Kind::Word, "café_日本$1"),
                (Kind::Op, "+"),
                (Kind::Word, "ñ"),
                (Kind::Word, "from"),
                (Kind::Word, "ß"),
                (Kind::Semicolon, ";")
            ]
        );
        assert_eq!(
            kinds("a<=>😀||-b"),
            vec![
                (Kind::Word, "a"),
                (Kind::Op, "<=>"),
                (Kind::Word, "😀"),
                (Kind::Op, "||-"),
                (Kind::Word, "b")
            ]
        );
    }
}
