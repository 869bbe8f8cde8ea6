//! Query-string bytes as the session's server reads them: decoded from its `client_encoding`, with the
//! readings that depend on `standard_conforming_strings` or on multibyte encodings made explicit.

use std::borrow::Cow;

use thiserror::Error;

use super::lex::{self, Kind};

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
    #[error("the query string is not a C string (it holds a NUL byte)")]
    Nul,
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
    let backslash_may_be_a_trail_byte = matches!(
        enc.as_str(),
        "SJIS"
            | "SHIFTJIS"
            | "SHIFTJIS2004"
            | "BIG5"
            | "GBK"
            | "GB18030"
            | "UHC"
            | "WIN932"
            | "WIN936"
            | "WIN949"
            | "WIN950"
    );
    if !backslash_may_be_a_trail_byte && bytes.windows(2).any(|w| w[0] >= 0x80 && w[1] == b'\\') {
        // In SJIS, BIG5, GBK, GB18030 and UHC a 0x5c after a high byte is part of a character, not a
        // backslash. A change of client_encoding may be in flight (SET in the same pipeline, set_config,
        // ROLLBACK …), so the server might read these bytes in such an encoding: nobody can say which.
        return Err(ReadError::Ambiguous);
    }
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
