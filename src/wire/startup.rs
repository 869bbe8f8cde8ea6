//! The untagged packets a connection opens with: StartupMessage, SSLRequest, GSSENCRequest and
//! CancelRequest, plus the handling of `stepgate.*` startup settings.
//!
//! Limits follow PostgreSQL's own: what is forwarded of a startup packet is at most [`MAX_STARTUP_LEN`] bytes.
//! The packet a client sends may be up to [`MAX_STARTUP_WITH_SETTINGS`] when the surplus is stepgate's own
//! settings (a long token in PGOPTIONS); the length is checked before any of its body is read.

use thiserror::Error;

use super::frame::{be_i32, be_u32, cstr};

/// Protocol 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: u32 = 3 << 16;
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// PostgreSQL's MAX_STARTUP_PACKET_LENGTH: the most that is forwarded.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// The most a client's startup packet may have, stepgate's settings included.
pub const MAX_STARTUP_WITH_SETTINGS: usize = 64 * 1024;
/// Prefix of the settings stepgate keeps for itself (case-insensitive, as PostgreSQL folds names).
pub const SETTING_PREFIX: &str = "stepgate.";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid startup packet length {0}")]
    BadLength(u32),
    #[error("startup packet of {0} bytes exceeds the limit of {MAX_STARTUP_WITH_SETTINGS} bytes")]
    TooLong(u32),
    #[error("startup packet of {0} bytes without stepgate's settings exceeds PostgreSQL's limit of {MAX_STARTUP_LEN} bytes (only stepgate settings may go past it)")]
    TooLongForServer(usize),
    #[error("unsupported frontend protocol {0}.{1}: stepgate supports protocol 3")]
    UnsupportedProtocol(u16, u16),
    #[error("malformed startup packet: {0}")]
    Malformed(&'static str),
    #[error("startup option {0:?} names a stepgate setting in a form stepgate does not accept; use -c stepgate.<name>=<value>")]
    OddStepgateOption(String),
    #[error(
        "unrecognized stepgate setting \"{0}\" (the startup packet may set stepgate.token only)"
    )]
    UnknownSetting(String),
    #[error("stepgate setting {0} is not valid UTF-8")]
    NotUtf8(String),
    #[error("options carries a stepgate setting and words PostgreSQL would read as stray arguments (a token with spaces?); pack the token first: stepgate token pack < token.asc")]
    StrayOption,
}

/// A parsed untagged packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    /// The original 16 bytes are kept so they can be forwarded unchanged.
    Cancel {
        pid: i32,
        key: i32,
        raw: [u8; 16],
    },
    Startup(StartupMessage),
}

/// A startup parameter as raw bytes: (name, value), in the client's encoding.
pub type Param = (Vec<u8>, Vec<u8>);

/// A StartupMessage: protocol version and the parameters in the order the client sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub version: u32,
    pub params: Vec<Param>,
}

/// Parses one untagged packet from the front of `buf`. `Ok(None)` means more bytes are needed; on success
/// the packet and the number of bytes it used are returned.
pub fn parse(buf: &[u8]) -> Result<Option<(StartupPacket, usize)>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let Some(len) = be_u32(buf, 0) else {
        return Ok(None);
    };
    if len < 8 {
        return Err(StartupError::BadLength(len));
    }
    if len as usize > MAX_STARTUP_WITH_SETTINGS {
        return Err(StartupError::TooLong(len));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let code = be_u32(buf, 4).unwrap_or(0);
    let packet = match code {
        SSL_REQUEST_CODE if len == 8 => StartupPacket::Ssl,
        GSSENC_REQUEST_CODE if len == 8 => StartupPacket::GssEnc,
        CANCEL_REQUEST_CODE if len == 16 => {
            let mut raw = [0u8; 16];
            raw.copy_from_slice(&buf[..16]);
            StartupPacket::Cancel {
                pid: be_i32(buf, 8).unwrap_or(0),
                key: be_i32(buf, 12).unwrap_or(0),
                raw,
            }
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            return Err(StartupError::Malformed("request code with a wrong length"))
        }
        version => {
            let (major, minor) = ((version >> 16) as u16, (version & 0xffff) as u16);
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol(major, minor));
            }
            StartupPacket::Startup(StartupMessage {
                version,
                params: last_wins(parse_params(&buf[8..len])?),
            })
        }
    };
    Ok(Some((packet, len)))
}

fn parse_params(mut rest: &[u8]) -> Result<Vec<Param>, StartupError> {
    let mut params = Vec::new();
    loop {
        let (key, after) = cstr(rest).ok_or(StartupError::Malformed("missing terminator"))?;
        if key.is_empty() {
            if !after.is_empty() {
                return Err(StartupError::Malformed("bytes after the terminator"));
            }
            return Ok(params);
        }
        let (value, after) =
            cstr(after).ok_or(StartupError::Malformed("parameter without a value"))?;
        params.push((key.to_vec(), value.to_vec()));
        rest = after;
    }
}

/// PostgreSQL reads startup parameters in order and a later one overrides an earlier one of the same name
/// (`user`, `database` and `options` are overwritten; settings are applied in order). Keeping only the
/// last of each name gives stepgate and the server one reading of the packet, and what is forwarded has
/// no duplicate left to read differently.
fn last_wins(params: Vec<Param>) -> Vec<Param> {
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<Param> = params
        .into_iter()
        .rev()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    kept.reverse();
    kept
}

fn is_stepgate_name(name: &[u8]) -> bool {
    name.len() >= SETTING_PREFIX.len()
        && name[..SETTING_PREFIX.len()].eq_ignore_ascii_case(SETTING_PREFIX.as_bytes())
}

fn mentions_stepgate(s: &[u8]) -> bool {
    s.windows(SETTING_PREFIX.len())
        .any(|w| w.eq_ignore_ascii_case(SETTING_PREFIX.as_bytes()))
}

impl StartupMessage {
    /// The value of a parameter, if present.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// A parameter as text for logs and session fields (lossy; never used for forwarding).
    pub fn get_lossy(&self, key: &str) -> String {
        self.get(key)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }

    /// The user name the server will log in.
    pub fn user(&self) -> String {
        self.get_lossy("user")
    }

    /// The database the server will open: as PostgreSQL does, the user name when `database` is missing or
    /// empty.
    pub fn database(&self) -> String {
        match self.get("database") {
            Some(d) if !d.is_empty() => String::from_utf8_lossy(d).into_owned(),
            _ => self.user(),
        }
    }

    /// Removes every `stepgate.*` setting, whether given as its own startup parameter or inside `options`
    /// as `-c stepgate.x=…`, `-cstepgate.x=…` or `--stepgate.x=…`, and returns them as (lower-cased name,
    /// value). Any other mention of stepgate inside `options` is refused rather than forwarded.
    pub fn take_stepgate_settings(&mut self) -> Result<Vec<(String, String)>, StartupError> {
        let mut taken = Vec::new();
        let mut kept = Vec::with_capacity(self.params.len());
        for (key, value) in std::mem::take(&mut self.params) {
            if is_stepgate_name(&key) {
                taken.push(setting(&key, &value)?);
            } else if key == b"options" {
                let rest = take_from_options(&value, &mut taken)?;
                if !rest.is_empty() {
                    kept.push((key, rest));
                }
            } else {
                kept.push((key, value));
            }
        }
        self.params = kept;
        Ok(taken)
    }

    /// Encodes the packet for the upstream server.
    pub fn encode(&self) -> Vec<u8> {
        let len = 8
            + self
                .params
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>()
            + 1;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        for (k, v) in &self.params {
            out.extend_from_slice(k);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out.push(0);
        out
    }
}

fn setting(name: &[u8], value: &[u8]) -> Result<(String, String), StartupError> {
    let name = String::from_utf8(name.to_vec())
        .map_err(|_| StartupError::NotUtf8("name".into()))?
        .to_ascii_lowercase();
    let value =
        String::from_utf8(value.to_vec()).map_err(|_| StartupError::NotUtf8(name.clone()))?;
    Ok((name, value))
}

/// Splits `options` the way PostgreSQL's `pg_split_opts` does: on whitespace, with a backslash escaping the
/// next byte.
pub fn split_options(options: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < options.len() {
        while i < options.len() && options[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= options.len() {
            break;
        }
        let mut tok = Vec::new();
        while i < options.len() && !options[i].is_ascii_whitespace() {
            if options[i] == b'\\' && i + 1 < options.len() {
                i += 1;
            }
            tok.push(options[i]);
            i += 1;
        }
        out.push(tok);
    }
    out
}

fn join_options(tokens: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, tok) in tokens.iter().enumerate() {
        if n > 0 {
            out.push(b' ');
        }
        for &b in tok {
            if b.is_ascii_whitespace() || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
    }
    out
}

/// `name=value` of a `-c` argument, if it names a stepgate setting.
fn stepgate_assignment(arg: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = arg.iter().position(|&b| b == b'=')?;
    let (name, value) = (&arg[..eq], &arg[eq + 1..]);
    is_stepgate_name(name).then_some((name, value))
}

fn take_from_options(
    options: &[u8],
    taken: &mut Vec<(String, String)>,
) -> Result<Vec<u8>, StartupError> {
    // Looked for in the words as PostgreSQL reads them (a backslash escapes the next byte: `st\epgate.x`
    // is `stepgate.x` to the server), never in the raw bytes.
    let tokens = split_options(options);
    if !tokens.iter().any(|t| mentions_stepgate(t)) {
        // The common case: nothing of ours inside, forward the original bytes untouched.
        return Ok(options.to_vec());
    }
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let tok = &tokens[i];
        let (arg, used) = if tok == b"-c" {
            (tokens.get(i + 1).map(|t| t.as_slice()), 2)
        } else if let Some(rest) = tok.strip_prefix(b"--").or_else(|| tok.strip_prefix(b"-c")) {
            (Some(rest), 1)
        } else {
            (None, 1)
        };
        match arg.and_then(stepgate_assignment) {
            Some((name, value)) => {
                taken.push(setting(name, value)?);
                i += used;
            }
            None => {
                if mentions_stepgate(tok) {
                    return Err(StartupError::OddStepgateOption(
                        String::from_utf8_lossy(tok).into_owned(),
                    ));
                }
                kept.push(tok.clone());
                i += 1;
            }
        }
    }
    // PostgreSQL splits `options` on whitespace: a clearsigned token put there raw leaves its other words
    // behind as arguments the server rejects and logs ("-----BEGIN requires a value"). Refuse rather than
    // forward any part of it.
    let mut i = 0;
    while i < kept.len() {
        // `-c name=value`, `-d 5`, …: a one-letter switch may take the next word as its argument.
        if kept[i].len() == 2 && kept[i][0] == b'-' {
            i += 2;
            continue;
        }
        if !kept[i].starts_with(b"-") {
            return Err(StartupError::StrayOption);
        }
        i += 1;
    }
    Ok(join_options(&kept))
}

#[cfg(test)]
#[path = "startup_tests.rs"]
mod tests;
