//! Values in the config file that are not plain TOML: durations (`"10s"`), sizes (`"1GiB"`), `host:port`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Smallest accepted `max_message_size`: PostgreSQL clients need at least this for ordinary traffic.
pub const MIN_MESSAGE_SIZE: usize = 64 * 1024;
/// PostgreSQL's own limit (MaxAllocSize).
pub const MAX_MESSAGE_SIZE: usize = 1 << 30;

/// Splits `host:port` (`[v6]:port` too). Returns None when there is no valid port.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some((host, port))
}

pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like \"10s\": {e}")))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

pub(super) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    match SizeValue::deserialize(d)? {
        SizeValue::Bytes(n) => Ok(Some(n as usize)),
        SizeValue::Text(s) => parse_size(&s).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{s:?} is not a size like \"1GiB\", \"64MB\" or 1048576"
            ))
        }),
    }
}

/// Parses `1GiB`, `64 MB`, `512kB`, `1048576`. Binary and decimal suffixes both mean powers of 1024, as in
/// PostgreSQL's own memory settings.
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().ok()?;
    let unit: u64 = match s[split..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    usize::try_from(n.checked_mul(unit)?).ok()
}
