//! Tokens as PostgreSQL's own scanner reads them (libpg_query's `scan.l`, the server's lexer compiled in):
//! what is a comment, a string, a quoted identifier or a dollar-quoted body, where an `E''` string continues
//! after a newline, what `U&"…" UESCAPE '…'` spells — all decided by the server's code, so splitting,
//! fingerprints and cache keys cannot be fooled by a semicolon or keyword hidden in a literal.
//!
//! The scanner reads with `standard_conforming_strings = on`. Only backslashes in plain `'…'` literals read
//! differently when it is off; callers that serve such a session treat a string with a backslash as
//! ambiguous unless both readings agree ([`super::Classifier::analyze`], the cache's shape key).

use pg_query::protobuf::{KeywordKind, Token as PgToken};
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
            Kind::QuotedIdent if self.text.len() >= 4 => {
                // U&"…" with the default escape character (a UESCAPE clause is a token of its own).
                unicode_unescape(
                    &self.text[3..self.text.len() - 1].replace("\"\"", "\""),
                    '\\',
                )
            }
            _ => None,
        }
    }
}

/// Decodes the escapes of a `U&` literal or identifier body as PostgreSQL does: `\\XXXX`, `\\+XXXXXX`, and
/// a doubled escape character. None for an invalid escape.
pub fn unicode_unescape(body: &str, esc: char) -> Option<String> {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c != esc {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&esc) {
            chars.next();
            out.push(esc);
            continue;
        }
        let n = if chars.peek() == Some(&'+') {
            chars.next();
            6
        } else {
            4
        };
        let hex: String = (0..n).filter_map(|_| chars.next()).collect();
        if hex.len() != n || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
    }
    Some(out)
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LexError {
    #[error("{0}")]
    Scanner(String),
}

/// Tokenizes `sql` with PostgreSQL's scanner: every significant token and comment, in order (whitespace
/// is not a token). `_standard_conforming_strings` is accepted for the callers' sake; see the module docs.
pub fn lex(sql: &str, _standard_conforming_strings: bool) -> Result<Vec<Token<'_>>, LexError> {
    let mut out = Vec::with_capacity(sql.len() / 4 + 4);
    lex_each(sql, true, |t, _| out.push(t))?;
    Ok(out)
}

/// [`lex`] without collecting: `each` sees every token in order with PostgreSQL's token number (the
/// cache's shape key needs no vector).
pub fn lex_each<'a>(
    sql: &'a str,
    _standard_conforming_strings: bool,
    mut each: impl FnMut(Token<'a>, i32),
) -> Result<(), LexError> {
    // Text with no token at all must not reach scan_tokens: pg_query 18.1 builds a slice from the null
    // token array it then returns (undefined behaviour; a debug build aborts). Only whitespace (PostgreSQL's
    // `[ \t\n\r\f\v]`) scans to nothing: comments are tokens, everything else is a token or an error.
    if sql
        .bytes()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
    {
        return Ok(());
    }
    let tokens = pg_query::scan_tokens(sql).map_err(|e| match e {
        pg_query::Error::Scan(m) => LexError::Scanner(m),
        other => LexError::Scanner(other.to_string()),
    })?;
    for t in tokens {
        let (Ok(start), Ok(end)) = (usize::try_from(t.start), usize::try_from(t.end)) else {
            return Err(LexError::Scanner("token offsets out of range".into()));
        };
        let Some(text) = sql.get(start..end) else {
            return Err(LexError::Scanner(format!(
                "a token ends inside a character at byte {end}"
            )));
        };
        each(
            Token {
                kind: kind_of(&t, text),
                text,
                start,
            },
            t.token,
        );
    }
    Ok(())
}

fn kind_of(t: &pg_query::protobuf::ScanToken, text: &str) -> Kind {
    if t.keyword_kind != KeywordKind::NoKeyword as i32 {
        return Kind::Word;
    }
    let Ok(tok) = PgToken::try_from(t.token) else {
        return Kind::Other;
    };
    use PgToken as T;
    match tok {
        T::SqlComment | T::CComment => Kind::Comment,
        T::Ident if text.starts_with('"') => Kind::QuotedIdent,
        T::Ident => Kind::Word,
        T::Uident => Kind::QuotedIdent,
        T::Sconst | T::Usconst | T::Bconst | T::Xconst => Kind::String,
        T::Iconst | T::Fconst => Kind::Number,
        T::Param => Kind::Param,
        T::Ascii59 => Kind::Semicolon,
        T::Ascii40
        | T::Ascii41
        | T::Ascii44
        | T::Ascii46
        | T::Ascii91
        | T::Ascii93
        | T::Ascii58 => Kind::Punct,
        T::Nul | T::Ascii92 | T::Ascii36 => Kind::Other,
        _ => Kind::Op,
    }
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
    fn e_strings_continue_after_a_newline_as_on_the_server() {
        // PostgreSQL continues a literal into one that follows after whitespace with a newline.
        let sql = "SELECT E'a'\n'\\' , ' ; DROP TABLE t ; --'";
        let k = kinds(sql);
        assert_eq!(k[1], (Kind::String, "E'a'\n'\\' , '"), "{k:?}");
        assert!(k.contains(&(Kind::Word, "DROP")), "{k:?}");
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
