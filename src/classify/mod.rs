//! Statement classification: the judgement the gate and `stepgate check` share (DESIGN.md "Statement
//! classes", "Statement fingerprints").
//!
//! Data flow for one query string: bytes in the session's `client_encoding` are decoded ([`decode`]),
//! tokenized exactly as the server would ([`lex`]), split at top-level semicolons ([`split`]), and each
//! statement is parsed with sqlparser's PostgreSqlDialect and judged from its syntax tree ([`ast`]); what
//! the parser rejects goes to the lexical rules in [`fallback`], which keep it guarded unless its tokens
//! prove a harmless shape. Calls to dangerous functions and ownership changes are found on the tokens, in
//! any position. [`cache`] makes repeated statements cost a hash lookup. Everything here is pure: no I/O, no
//! globals.

pub mod ast;
pub mod cache;
pub mod class;
pub mod fallback;
pub mod lex;
pub mod split;

use std::borrow::Cow;
use std::collections::HashSet;

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use thiserror::Error;

pub use class::Class;
use lex::{Kind, Token};

/// Functions that make a statement privileged wherever they are called. `*` matches any run of characters.
pub const DEFAULT_DANGEROUS_FUNCTIONS: &[&str] = &[
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_switch_xlog",
    "lo_import",
    "lo_export",
    "lo_unlink",
    "lo_from_bytea",
    "lo_put",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_stat_file",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "dblink",
    "dblink_exec",
    "dblink_connect",
    "dblink_connect_u",
    "dblink_send_query",
    "pg_drop_replication_slot",
    "pg_create_*_replication_slot",
    "pg_replication_origin_*",
    "pg_logical_emit_message",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_create_restore_point",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
];

/// Why a query string could not be read at all (every statement in it is `unparsed`).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ReadError {
    #[error("not valid {0}")]
    Encoding(String),
    #[error("client_encoding {0} is not supported by the classifier")]
    UnsupportedEncoding(String),
    #[error("the statement reads differently with and without standard_conforming_strings or in byte and character form")]
    Ambiguous,
    #[error("{0}")]
    Lex(#[from] lex::LexError),
}

/// How the session's server will read the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LexSettings {
    pub standard_conforming_strings: bool,
    /// The session's `client_encoding` as the server reports it (e.g. `UTF8`, `LATIN1`).
    pub client_encoding: String,
}

impl Default for LexSettings {
    fn default() -> Self {
        LexSettings {
            standard_conforming_strings: true,
            client_encoding: "UTF8".into(),
        }
    }
}

/// A decoded query string with each statement's verdict and fingerprint.
pub type Decoded<'a> = (Cow<'a, str>, Vec<(Verdict, String)>);

/// The judgement of one statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub class: Class,
    /// A literal took part in the decision: a cache must key this statement by its exact text.
    pub literal_sensitive: bool,
    /// sqlparser rejected the statement and the lexical rules judged it.
    pub fallback: bool,
}

/// One statement of a query string with its verdict.
#[derive(Debug, Clone)]
pub struct Analyzed<'a> {
    pub text: &'a str,
    /// Byte offset of `text` in the decoded query string.
    pub start: usize,
    pub tokens: Vec<Token<'a>>,
    pub verdict: Verdict,
}

impl Analyzed<'_> {
    pub fn fingerprint(&self) -> String {
        split::fingerprint(&self.tokens)
    }
}

/// The classifier: pure, cheap to share, configured with the dangerous-function list.
#[derive(Debug, Clone)]
pub struct Classifier {
    exact: HashSet<String>,
    globs: Vec<(String, String)>,
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier::new(DEFAULT_DANGEROUS_FUNCTIONS.iter().map(|s| s.to_string()))
    }
}

impl Classifier {
    /// A classifier with this dangerous-function list (names case-folded; `*` is a wildcard).
    pub fn new(functions: impl IntoIterator<Item = String>) -> Self {
        let mut exact = HashSet::new();
        let mut globs = Vec::new();
        for f in functions {
            let f = f.to_ascii_lowercase();
            match f.split_once('*') {
                Some((a, b)) => globs.push((a.to_string(), b.to_string())),
                None => {
                    exact.insert(f);
                }
            }
        }
        Classifier { exact, globs }
    }

    fn is_dangerous(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.exact.contains(&name)
            || self.globs.iter().any(|(a, b)| {
                name.len() >= a.len() + b.len()
                    && name.starts_with(a.as_str())
                    && name.ends_with(b.as_str())
            })
    }

    /// Splits and classifies a decoded query string. A string that cannot be tokenized (an unterminated
    /// literal or comment), or that reads two ways, is one `unparsed` statement.
    pub fn analyze<'a>(
        &self,
        sql: &'a str,
        settings: &LexSettings,
    ) -> Result<Vec<Analyzed<'a>>, ReadError> {
        let tokens = lex::lex(sql, settings.standard_conforming_strings)?;
        if !settings.standard_conforming_strings && sql.contains('\\') {
            // The server reads backslashes in '…' as escapes; sqlparser does not. Where the two readings put
            // token boundaries in different places, nobody can say what the statement is.
            let other = lex::lex(sql, true).map_err(|_| ReadError::Ambiguous)?;
            let bounds = |t: &[Token<'_>]| -> Vec<(usize, usize)> {
                t.iter()
                    .filter(|t| !t.is_trivia())
                    .map(|t| (t.start, t.text.len()))
                    .collect()
            };
            if bounds(&tokens) != bounds(&other) {
                return Err(ReadError::Ambiguous);
            }
        }
        Ok(split::split(sql, &tokens)
            .into_iter()
            .map(|s| {
                let verdict = self.judge(&s.tokens);
                Analyzed {
                    text: s.text,
                    start: s.start,
                    tokens: s.tokens,
                    verdict,
                }
            })
            .collect())
    }

    /// Decodes `bytes` in the session's encoding and analyzes them.
    pub fn analyze_bytes<'a>(
        &self,
        bytes: &'a [u8],
        settings: &LexSettings,
    ) -> Result<Decoded<'a>, ReadError> {
        let text = decode(bytes, settings)?;
        let verdicts = self
            .analyze(&text, settings)?
            .into_iter()
            .map(|a| (a.verdict, a.fingerprint()))
            .collect();
        Ok((text, verdicts))
    }

    /// The verdict for one statement's significant tokens.
    pub fn judge(&self, tokens: &[Token<'_>]) -> Verdict {
        let mut found = ast::Findings::default();
        let text = parse_text(tokens);
        let dialect = PostgreSqlDialect {};
        let parsed = Parser::parse_sql(&dialect, &text);
        let (mut class, fallback) = match parsed {
            Ok(stmts) if stmts.len() == 1 => (ast::classify(&stmts[0], &mut found), false),
            _ => {
                let sub = |t: &[Token<'_>], f: &mut ast::Findings| {
                    let v = self.judge(t);
                    f.literal_sensitive |= v.literal_sensitive;
                    v.class
                };
                (fallback::classify(tokens, &mut found, &sub), true)
            }
        };
        class = class.max(self.lexical_overlay(tokens));
        Verdict {
            class,
            literal_sensitive: found.literal_sensitive,
            fallback,
        }
    }

    /// What the tokens alone prove, in any position: calls to dangerous functions and ownership changes.
    fn lexical_overlay(&self, tokens: &[Token<'_>]) -> Class {
        let mut class = Class::Read;
        for (i, t) in tokens.iter().enumerate() {
            let next = tokens.get(i + 1);
            if matches!(t.kind, Kind::Word | Kind::QuotedIdent)
                && next.is_some_and(|n| n.text == "(")
            {
                if let Some(name) = t.ident() {
                    if self.is_dangerous(&name) {
                        return Class::Privileged;
                    }
                }
            }
            if t.is_word("owner") && next.is_some_and(|n| n.is_word("to")) {
                class = Class::Privileged;
            }
        }
        class
    }
}

/// True when a token's text names a stepgate setting in a way that matters: `stepgate.` anywhere, or
/// `stepgate` inside an escaped (`E''`, `U&''`) literal where escapes could spell the dot.
pub fn mentions_stepgate_text(text: &str) -> bool {
    // Allocation-free: this runs for every string literal of every new query string.
    let b = text.as_bytes();
    let has = |needle: &[u8]| {
        b.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    if !has(b"stepgate") {
        return false;
    }
    let escaped =
        b.len() >= 2 && (b[..2].eq_ignore_ascii_case(b"e'") || b[..2].eq_ignore_ascii_case(b"u&"));
    has(b"stepgate.") || escaped
}

/// True when a statement needs more than its class to be judged by the gate: it manages prepared
/// statements (PREPARE, EXECUTE, DEALLOCATE, DISCARD), is a SET/RESET/SHOW, or mentions a stepgate setting.
pub fn needs_attention(tokens: &[Token<'_>]) -> bool {
    let first = tokens
        .first()
        .map(|t| t.text.to_ascii_lowercase())
        .unwrap_or_default();
    if matches!(
        first.as_str(),
        "set" | "reset" | "show" | "prepare" | "execute" | "deallocate" | "discard"
    ) {
        return true;
    }
    tokens.iter().enumerate().any(|(i, t)| {
        t.is_word("execute")
            || (matches!(t.kind, Kind::Word | Kind::QuotedIdent)
                && t.ident()
                    .is_some_and(|n| n.eq_ignore_ascii_case("stepgate"))
                && tokens.get(i + 1).is_some_and(|n| n.text == "."))
            || (matches!(t.kind, Kind::String | Kind::QuotedIdent)
                && mentions_stepgate_text(t.text))
    })
}

/// The statement as sqlparser will see it: the original text with every comment replaced by a space, so the
/// two lexers cannot disagree about where a comment ends.
fn parse_text(tokens: &[Token<'_>]) -> String {
    let mut out = String::new();
    let mut end = None;
    for t in tokens {
        if let Some(e) = end {
            if t.start > e {
                out.push(' ');
            }
        }
        out.push_str(t.text);
        end = Some(t.start + t.text.len());
    }
    out
}

/// Decodes a query string from the session's `client_encoding` into text that lexes as the server reads it.
///
/// Single-byte encodings and the EUC family never put an ASCII byte inside a multibyte character, so a
/// byte-for-char mapping keeps every quote, backslash and semicolon where the server sees it. The encodings
/// whose multibyte characters may contain ASCII bytes (SJIS, BIG5, GBK, GB18030, UHC) are decoded properly,
/// and a string whose byte-wise and character-wise readings differ is refused as ambiguous.
pub fn decode<'a>(bytes: &'a [u8], settings: &LexSettings) -> Result<Cow<'a, str>, ReadError> {
    if bytes.is_ascii() {
        // Every encoding PostgreSQL supports as a client encoding is ASCII-compatible (and this is the hot
        // path: nothing is allocated).
        return Ok(Cow::Borrowed(
            std::str::from_utf8(bytes).expect("ASCII is UTF-8"),
        ));
    }
    let client_encoding = settings.client_encoding.as_str();
    let enc = client_encoding.to_ascii_uppercase().replace(['-', '_'], "");
    let latin = || Cow::Owned(bytes.iter().map(|&b| b as char).collect::<String>());
    match enc.as_str() {
        "UTF8" | "UNICODE" => std::str::from_utf8(bytes)
            .map(Cow::Borrowed)
            .map_err(|_| ReadError::Encoding("UTF-8".into())),
        "SQLASCII" => Ok(std::str::from_utf8(bytes)
            .map(Cow::Borrowed)
            .unwrap_or_else(|_| latin())),
        "SJIS" | "SHIFTJIS" | "SHIFTJIS2004" | "BIG5" | "GBK" | "GB18030" | "UHC" | "WIN932"
        | "WIN936" | "WIN949" | "WIN950" => {
            let encoding = match enc.as_str() {
                "SJIS" | "SHIFTJIS" | "SHIFTJIS2004" | "WIN932" => encoding_rs::SHIFT_JIS,
                "BIG5" | "WIN950" => encoding_rs::BIG5,
                "GBK" | "WIN936" => encoding_rs::GBK,
                "GB18030" => encoding_rs::GB18030,
                _ => encoding_rs::EUC_KR,
            };
            let (text, _, had_errors) = encoding.decode(bytes);
            if had_errors {
                return Err(ReadError::Encoding(client_encoding.to_string()));
            }
            let bytewise = latin();
            let shape = |s: &str| -> Option<Vec<Kind>> {
                lex::lex(s, settings.standard_conforming_strings)
                    .ok()
                    .map(|t| {
                        t.iter()
                            .filter(|t| !t.is_trivia())
                            .map(|t| t.kind)
                            .collect()
                    })
            };
            if shape(&text) != shape(&bytewise) {
                return Err(ReadError::Ambiguous);
            }
            Ok(Cow::Owned(text.into_owned()))
        }
        "JOHAB" | "MULEINTERNAL" => {
            Err(ReadError::UnsupportedEncoding(client_encoding.to_string()))
        }
        _ => Ok(latin()),
    }
}

#[cfg(test)]
mod tests;
