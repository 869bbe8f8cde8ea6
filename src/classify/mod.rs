//! Statement classification: the judgement the gate and `stepgate check` share (DESIGN.md "Statement
//! classes", "Statement fingerprints").
//!
//! PostgreSQL's own grammar is the referee (libpg_query compiled in, through the `pg_query` crate). Data
//! flow for one query string: bytes in the session's `client_encoding` are decoded ([`decode`]), tokenized by
//! PostgreSQL's scanner ([`lex`]) and parsed by PostgreSQL's parser ([`tree`]), which also gives the
//! statement boundaries. Each statement is judged on PostgreSQL's tree ([`tree::judge`]); where sqlparser
//! (PostgreSqlDialect) parses it too, its detailed rule walk ([`ast`]) may raise the class, never lower it.
//! What PostgreSQL's parser rejects, or what nests deeper than the parse budget, is `unparsed` with the
//! parser's own message. Calls to dangerous functions ([`default_dangerous_functions`]) are found on the tree,
//! with names decoded as the server decodes them. [`cache`] makes repeated statements cost a scan and a
//! hash lookup. Everything here is pure: no I/O, no globals.

pub mod ast;
pub mod cache;
pub mod lex;
pub mod session_cmd;
pub mod split;
pub mod text;
pub mod tree;

use std::borrow::Cow;
use std::collections::HashSet;

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

pub use crate::config::Class;
use lex::{Kind, Token};
pub use text::{decode, LexSettings, ReadError};

/// The built-in dangerous-function list, one name or `*` pattern per line with a comment per group
/// (`src/classify/dangerous_functions.txt`).
pub const DANGEROUS_FUNCTIONS_FILE: &str = include_str!("dangerous_functions.txt");

/// Functions that make a statement privileged wherever they are called. `*` matches any run of characters.
pub fn default_dangerous_functions() -> Vec<String> {
    DANGEROUS_FUNCTIONS_FILE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// The parse budget: a query string longer than this is not parsed, and is `unparsed`.
pub const MAX_PARSE_BYTES: usize = 64 << 20;
/// The parse budget: a query string with more tokens than this is not parsed, and is `unparsed` (the tree of
/// one token costs a few hundred bytes while it is judged).
pub const MAX_PARSE_TOKENS: usize = 250_000;
/// Above this size sqlparser's walk is skipped: PostgreSQL's tree alone judges (sqlparser may only raise a
/// class, and costs far more per byte).
const MAX_SQLPARSER_BYTES: usize = 256 << 10;

/// A decoded query string with each statement's verdict and fingerprint.
pub type Decoded<'a> = (Cow<'a, str>, Vec<(Verdict, String)>);

/// The judgement of one statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub class: Class,
    /// A literal took part in the decision: a cache must key this statement by its exact text.
    pub literal_sensitive: bool,
    /// sqlparser rejected the statement: PostgreSQL's tree alone judged it.
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
    /// The rule that gave the class (`DELETE without WHERE`, `calls pg_read_file`,
    /// `PostgreSQL: syntax error at or near "x"`).
    pub reason: String,
    /// For SQL FETCH/MOVE: the portal it runs, as PostgreSQL's parser read the name (decoded and
    /// truncated to NAMEDATALEN - 1 bytes).
    pub fetch_portal: Option<String>,
    /// PostgreSQL's tree names a stepgate setting somewhere ([`tree::mentions_stepgate`]).
    pub mentions_stepgate: bool,
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
        Classifier::new(default_dangerous_functions())
    }
}

impl Classifier {
    /// The classifier with a configuration's dangerous-function list.
    pub fn for_config(config: &crate::config::Config) -> Classifier {
        match &config.dangerous_functions {
            Some(list) => Classifier::new(list.iter().cloned()),
            None => Classifier::default(),
        }
    }

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

    /// True when calling `name` (unqualified, any case) makes a statement privileged.
    pub fn is_dangerous(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.exact.contains(&name)
            || self.globs.iter().any(|(a, b)| {
                name.len() >= a.len() + b.len()
                    && name.starts_with(a.as_str())
                    && name.ends_with(b.as_str())
            })
    }

    /// Splits and classifies a decoded query string as PostgreSQL reads it. A string PostgreSQL's parser
    /// rejects is one `unparsed` statement (the server runs none of it) carrying the parser's message; a
    /// string that cannot be tokenized, or that reads two ways, is an error.
    pub fn analyze<'a>(
        &self,
        sql: &'a str,
        settings: &LexSettings,
    ) -> Result<Vec<Analyzed<'a>>, ReadError> {
        if sql.contains('\0') {
            return Err(ReadError::Nul);
        }
        let over_budget = |why: String| {
            let text = sql.trim();
            let start = sql.len() - sql.trim_start().len();
            Ok(vec![Analyzed {
                text,
                start,
                tokens: Vec::new(),
                verdict: Verdict {
                    class: Class::Unparsed,
                    literal_sensitive: true,
                    fallback: true,
                },
                reason: why,
                fetch_portal: None,
                mentions_stepgate: false,
            }])
        };
        if sql.len() > MAX_PARSE_BYTES {
            return over_budget(format!(
                "the query string has {} bytes, more than stepgate's parse budget of {MAX_PARSE_BYTES}",
                sql.len()
            ));
        }
        let tokens = lex::lex(sql, true)?;
        let significant_tokens = tokens.iter().filter(|t| !t.is_trivia()).count();
        if significant_tokens > MAX_PARSE_TOKENS {
            return over_budget(format!(
                "the query string has {significant_tokens} tokens, more than stepgate's parse budget of {MAX_PARSE_TOKENS}"
            ));
        }
        let scs = settings.standard_conforming_strings;
        // A backslash reads differently with standard_conforming_strings off, and a change of that setting
        // may be in flight (SET in the same pipeline, set_config, ROLLBACK, RESET ALL …). So whatever the
        // session's setting is believed to be, a string with a backslash is parsed both ways: both readings
        // must give the same statements (compared without positions and string values: an escape changes a
        // literal's value, not what the statement is), and each statement takes the more dangerous verdict.
        let other = if sql.contains('\\') {
            let strip = |r: &Result<Vec<(usize, usize, serde_json::Value)>, String>| {
                r.as_ref().ok().map(|v| {
                    v.iter()
                        .map(|(a, b, t)| (*a, *b, tree::without_values(t)))
                        .collect::<Vec<_>>()
                })
            };
            let (this, that) = (tree::parse(sql, scs), tree::parse(sql, !scs));
            if this.is_ok() != that.is_ok() || strip(&this) != strip(&that) {
                return Err(ReadError::Ambiguous);
            }
            that.ok()
        } else {
            None
        };
        let significant = |from: usize, to: usize| -> Vec<Token<'a>> {
            tokens
                .iter()
                .filter(|t| t.start >= from && t.start < to && !t.is_trivia())
                .copied()
                .collect()
        };
        let statement = |toks: Vec<Token<'a>>,
                         verdict: Verdict,
                         reason: String,
                         fetch_portal: Option<String>,
                         mentions_stepgate: bool| {
            let mut toks = toks;
            while toks.last().is_some_and(|t| t.kind == Kind::Semicolon) {
                toks.pop();
            }
            let (first, last) = (toks.first()?, toks.last()?);
            let (start, end) = (first.start, last.start + last.text.len());
            Some(Analyzed {
                text: &sql[start..end],
                start,
                tokens: toks,
                verdict,
                reason,
                fetch_portal,
                mentions_stepgate,
            })
        };
        match tree::parse(sql, scs) {
            Err(message) => Ok(statement(
                significant(0, sql.len()),
                Verdict {
                    class: Class::Unparsed,
                    literal_sensitive: true,
                    fallback: true,
                },
                format!("PostgreSQL: {message}"),
                None,
                false,
            )
            .into_iter()
            .collect()),
            Ok(stmts) => {
                // Every statement PostgreSQL found must have tokens of its own; if the scanner and the
                // parser disagree on where it is, nobody can say what it is.
                if stmts
                    .iter()
                    .any(|(from, to, _)| significant(*from, *to).is_empty())
                {
                    return Err(ReadError::Ambiguous);
                }
                Ok(stmts
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, (from, to, t))| {
                        let toks = significant(from, to);
                        let (mut verdict, mut reason) = self.judge_tree(&t, &toks);
                        if let Some((_, _, t2)) = other.as_ref().and_then(|o| o.get(i)) {
                            let (v2, r2) = self.judge_tree(t2, &toks);
                            verdict.literal_sensitive |= v2.literal_sensitive;
                            if v2.class > verdict.class {
                                verdict.class = v2.class;
                                reason = r2;
                            }
                        }
                        let mentions = tree::mentions_stepgate(&t)
                            || other
                                .as_ref()
                                .and_then(|o| o.get(i))
                                .is_some_and(|(_, _, t2)| tree::mentions_stepgate(t2));
                        statement(toks, verdict, reason, tree::fetch_portal(&t), mentions)
                    })
                    .collect())
            }
        }
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

    /// The verdict for one statement's significant tokens (e.g. the statement inside a PREPARE), parsed by
    /// PostgreSQL's grammar.
    pub fn judge(&self, tokens: &[Token<'_>]) -> Verdict {
        self.judge_reason(tokens).0
    }

    /// [`Classifier::judge`] with the rule that gave the class.
    pub fn judge_reason(&self, tokens: &[Token<'_>]) -> (Verdict, String) {
        let text = parse_text(tokens);
        match tree::parse(&text, true) {
            Err(message) => (
                Verdict {
                    class: Class::Unparsed,
                    literal_sensitive: true,
                    fallback: true,
                },
                format!("PostgreSQL: {message}"),
            ),
            Ok(stmts) => {
                let mut best: Option<(Verdict, String)> = None;
                for (_, _, t) in &stmts {
                    let (v, why) = self.judge_tree(t, tokens);
                    best = Some(match best {
                        Some((b, bw)) if b.class >= v.class => (
                            Verdict {
                                literal_sensitive: b.literal_sensitive | v.literal_sensitive,
                                fallback: b.fallback | v.fallback,
                                ..b
                            },
                            bw,
                        ),
                        Some((b, _)) => (
                            Verdict {
                                literal_sensitive: b.literal_sensitive | v.literal_sensitive,
                                fallback: b.fallback | v.fallback,
                                ..v
                            },
                            why,
                        ),
                        None => (v, why),
                    });
                }
                best.unwrap_or((
                    Verdict {
                        class: Class::Read,
                        literal_sensitive: false,
                        fallback: false,
                    },
                    "empty statement".into(),
                ))
            }
        }
    }

    /// One statement: PostgreSQL's tree decides; sqlparser's rule walk, where it parses the statement, and
    /// the lexical overlay may only raise the class.
    fn judge_tree(&self, t: &serde_json::Value, tokens: &[Token<'_>]) -> (Verdict, String) {
        let pg = tree::judge(t, &|n| self.is_dangerous(n));
        let mut class = pg.class;
        let mut reason = pg.reason;
        let mut found = ast::Findings::default();
        let text = parse_text(tokens);
        let dialect = PostgreSqlDialect {};
        let parsed = if text.len() <= MAX_SQLPARSER_BYTES {
            Parser::parse_sql(&dialect, &text).ok()
        } else {
            None
        };
        let fallback = match parsed {
            Some(stmts) if stmts.len() == 1 => {
                let sp = ast::classify(&stmts[0], &mut found);
                if sp > class {
                    class = sp;
                    reason = format!("sqlparser's rule walk: {}", sp.as_str());
                }
                false
            }
            _ => true,
        };
        let overlay = self.lexical_overlay(tokens);
        if overlay > class {
            class = overlay;
            reason = "names a dangerous function or an ownership change".into();
        }
        (
            Verdict {
                class,
                literal_sensitive: pg.literal_sensitive || found.literal_sensitive,
                fallback,
            },
            reason,
        )
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

/// The tables, views, sequences and dropped objects `sql` names without a schema: they resolve through the
/// session's `search_path` when the statement runs ([`tree::unqualified_names`]). A statement PostgreSQL
/// cannot parse yields `["(unparsable)"]`.
pub fn unqualified_names(sql: &str) -> Vec<String> {
    match tree::parse(sql, true) {
        Ok(stmts) => {
            let mut names: Vec<String> = stmts
                .iter()
                .flat_map(|(_, _, t)| tree::unqualified_names(t))
                .collect();
            names.sort();
            names.dedup();
            names
        }
        Err(_) => vec!["(unparsable)".into()],
    }
}

/// True when an error or a rollback provably undoes everything `sql` did: every statement in it parses and
/// runs transactionally ([`tree::non_transactional`] finds nothing).
pub fn undone_by_rollback(sql: &str) -> bool {
    match tree::parse(sql, true) {
        Ok(stmts) => !stmts.is_empty() && stmts.iter().all(|(_, _, t)| !tree::non_transactional(t)),
        Err(_) => false,
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
/// statements (PREPARE, EXECUTE, DEALLOCATE, DISCARD), runs a portal (FETCH, MOVE), is a SET/RESET/SHOW, or
/// mentions a stepgate setting (the tree-based [`tree::mentions_stepgate`] adds the decoded spellings).
pub fn needs_attention(tokens: &[Token<'_>]) -> bool {
    let first = tokens
        .first()
        .map(|t| t.text.to_ascii_lowercase())
        .unwrap_or_default();
    if matches!(
        first.as_str(),
        "set"
            | "reset"
            | "show"
            | "prepare"
            | "execute"
            | "deallocate"
            | "discard"
            | "fetch"
            | "move"
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

#[cfg(test)]
mod tests;
