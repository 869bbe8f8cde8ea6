//! `stepgate audit verify` and `stepgate audit show`: re-check a log's hash chain and its signed tokens, and
//! print its records as a table.
//!
//! Verification walks the records in order (rotated files first) and stops at the first problem: a line that
//! is not a record, a gap in `seq` (a record deleted), `seq` going backwards (records reordered), a `prev`
//! that is not the hash of the line before (that earlier record was changed), a token that does not verify
//! with the public keys at the record's time (a forged token), an authorization by a token never set, and —
//! with `--expect-head` — a log cut short of, or differing from, a head recorded elsewhere.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::audit::{hash_line, log_files, GENESIS};
use crate::token::signed::{self, Keyring};
use crate::token::Payload;

/// The first problem found, and where.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// The record the problem is about.
    pub seq: u64,
    pub file: String,
    pub line: usize,
    pub problem: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub records: u64,
    pub authorizations: u64,
    pub signers: Vec<String>,
    /// `seq:hash` of the last record.
    pub head: String,
    pub signatures_checked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Problem>,
}

/// Expands directories into their log files (chain order); files are taken as given.
pub fn expand(paths: &[PathBuf]) -> Vec<PathBuf> {
    paths
        .iter()
        .flat_map(|p| {
            if p.is_dir() {
                log_files(p)
            } else {
                vec![p.clone()]
            }
        })
        .collect()
}

/// Parses `SEQ:sha256:HEX`.
pub fn parse_head(s: &str) -> Option<(u64, String)> {
    let (seq, hash) = s.split_once(':')?;
    let hex = hash.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| Some((seq.parse().ok()?, hash.to_ascii_lowercase())))
        .flatten()
}

struct Line {
    file: String,
    line: usize,
    bytes: Vec<u8>,
}

/// A log file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct ReadError {
    pub path: String,
    pub source: std::io::Error,
}

fn read_lines(files: &[PathBuf]) -> Result<Vec<Line>, ReadError> {
    let mut out = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|source| ReadError {
            path: f.display().to_string(),
            source,
        })?;
        let name = f.display().to_string();
        let mut parts: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        if parts.last().is_some_and(|l| l.is_empty()) {
            parts.pop();
        }
        for (i, l) in parts.into_iter().enumerate() {
            out.push(Line {
                file: name.clone(),
                line: i + 1,
                bytes: l.to_vec(),
            });
        }
    }
    Ok(out)
}

/// Verifies the chain of `files` (in order). `Err` only for files that cannot be read.
pub fn verify(
    files: &[PathBuf],
    keyring: Option<&Keyring>,
    expect_head: Option<&(u64, String)>,
) -> Result<Report, ReadError> {
    let lines = read_lines(files)?;
    let mut report = Report {
        ok: true,
        records: 0,
        authorizations: 0,
        signers: Vec::new(),
        head: format!("0:{GENESIS}"),
        signatures_checked: keyring.is_some(),
        error: None,
    };
    let mut signers = BTreeSet::new();
    let mut tokens_set: HashSet<String> = HashSet::new();
    let mut prev = GENESIS.to_string();
    let mut expected = 1u64;
    let mut hashes: Vec<String> = Vec::with_capacity(lines.len());
    let fail = |report: &mut Report, seq: u64, l: &Line, problem: String| {
        report.ok = false;
        report.error = Some(Problem {
            seq,
            file: l.file.clone(),
            line: l.line,
            problem,
        });
    };
    for (i, l) in lines.iter().enumerate() {
        let v: Value = match serde_json::from_slice(&l.bytes) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                fail(
                    &mut report,
                    expected,
                    l,
                    "not a JSON record (changed or cut short)".into(),
                );
                return Ok(report);
            }
        };
        let Some(seq) = v["seq"].as_u64() else {
            fail(&mut report, expected, l, "record without a seq".into());
            return Ok(report);
        };
        if seq > expected {
            let later = lines[i + 1..].iter().any(|x| {
                serde_json::from_slice::<Value>(&x.bytes)
                    .ok()
                    .and_then(|v| v["seq"].as_u64())
                    == Some(expected)
            });
            if later {
                fail(
                    &mut report,
                    expected,
                    l,
                    format!("reordered: record {seq} comes before record {expected}"),
                );
                return Ok(report);
            }
            let missing = if seq == expected + 1 {
                format!("record {expected} is missing")
            } else {
                format!("records {expected}..{} are missing", seq - 1)
            };
            fail(
                &mut report,
                expected,
                l,
                format!("{missing} (the next record has seq {seq})"),
            );
            return Ok(report);
        }
        if seq < expected {
            fail(
                &mut report,
                seq,
                l,
                format!(
                    "reordered: record {seq} comes after record {}",
                    expected - 1
                ),
            );
            return Ok(report);
        }
        if v["prev"].as_str() != Some(prev.as_str()) {
            if i == 0 {
                fail(
                    &mut report,
                    seq,
                    l,
                    "the first record does not start the chain (prev is not the genesis hash): earlier records are missing".into(),
                );
            } else {
                let before = &lines[i - 1];
                fail(
                    &mut report,
                    seq - 1,
                    before,
                    format!(
                        "hash mismatch: record {} was changed after record {seq} was written (its hash is not record {seq}'s prev)",
                        seq - 1
                    ),
                );
            }
            return Ok(report);
        }
        match v["event"].as_str() {
            // A token set by a session, or approved for every session it names: either holds its uses.
            Some("token_set") | Some("approved") => {
                let id = v["token_id"].as_str().unwrap_or_default().to_string();
                if let Some(ring) = keyring {
                    let Some(token) = v["token"].as_str() else {
                        fail(&mut report, seq, l, "token_set without its token".into());
                        return Ok(report);
                    };
                    let at = v["time"]
                        .as_str()
                        .and_then(|t| humantime::parse_rfc3339(t).ok())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    match signed::verify(token.as_bytes(), ring, at) {
                        Err(e) => {
                            fail(
                                &mut report,
                                seq,
                                l,
                                format!("signature invalid: the token does not verify ({e})"),
                            );
                            return Ok(report);
                        }
                        Ok(s) => {
                            let pid = Payload::parse(&s.payload).map(|p| p.id).unwrap_or_default();
                            if pid != id {
                                fail(
                                    &mut report,
                                    seq,
                                    l,
                                    format!(
                                        "the signed token has id {pid:?}, the record says {id:?}"
                                    ),
                                );
                                return Ok(report);
                            }
                        }
                    }
                }
                tokens_set.insert(id);
            }
            Some("authorized") => {
                report.authorizations += 1;
                let id = v["token_id"].as_str().unwrap_or_default();
                if !tokens_set.contains(id) {
                    fail(
                        &mut report,
                        seq,
                        l,
                        format!("authorization by token {id:?}, which no earlier token_set or approved record holds"),
                    );
                    return Ok(report);
                }
                for s in v["signers"].as_array().into_iter().flatten() {
                    let who = s["name"]
                        .as_str()
                        .or(s["user_id"].as_str())
                        .unwrap_or_default();
                    signers.insert(who.to_string());
                }
            }
            _ => {}
        }
        prev = hash_line(&l.bytes);
        hashes.push(prev.clone());
        expected = seq + 1;
        report.records += 1;
    }
    report.head = format!("{}:{prev}", expected - 1);
    report.signers = signers.into_iter().collect();
    if let Some((seq, hash)) = expect_head {
        let last = expected - 1;
        let problem = if *seq > last {
            Some((
                last,
                format!("cut short: the log ends at record {last}, the recorded head is {seq}"),
            ))
        } else if *seq >= 1 && hashes[(*seq - 1) as usize] != *hash {
            Some((
                *seq,
                format!("record {seq} differs from the recorded head {seq}:{hash}"),
            ))
        } else {
            None
        };
        if let Some((at, problem)) = problem {
            report.ok = false;
            let l = lines.get((at.max(1) - 1) as usize);
            report.error = Some(Problem {
                seq: at,
                file: l.map(|l| l.file.clone()).unwrap_or_default(),
                line: l.map(|l| l.line).unwrap_or(0),
                problem,
            });
        }
    }
    Ok(report)
}

/// The text form of a report: one line.
pub fn render(report: &Report) -> String {
    match &report.error {
        None => format!(
            "ok: {} records, {} authorizations, signers: {}; head {}{}",
            report.records,
            report.authorizations,
            if report.signers.is_empty() {
                "-".to_string()
            } else {
                report.signers.join(", ")
            },
            report.head,
            if report.signatures_checked {
                ""
            } else {
                " (signatures not checked: no --keyring)"
            }
        ),
        Some(p) => format!(
            "BROKEN at record {} ({} line {}): {}",
            p.seq, p.file, p.line, p.problem
        ),
    }
}

/// Filters for `audit show`.
#[derive(Debug, Default)]
pub struct ShowFilter {
    pub event: Option<String>,
    pub since: Option<std::time::SystemTime>,
    pub user: Option<String>,
    pub database: Option<String>,
}

/// `audit show`: a readable table of the records that pass the filter.
pub fn show(files: &[PathBuf], f: &ShowFilter) -> Result<String, ReadError> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:27}  {:13}  {:12}  {:12}  {:36}  WHAT",
        "SEQ", "TIME", "EVENT", "USER", "DATABASE", "HELD / TOKEN"
    );
    let mut n = 0;
    for l in read_lines(files)? {
        let Ok(v) = serde_json::from_slice::<Value>(&l.bytes) else {
            let _ = writeln!(
                out,
                "{:>6}  (line {} of {} is not a record)",
                "?", l.line, l.file
            );
            continue;
        };
        let s = |k: &str| v[k].as_str().unwrap_or_default();
        if f.event.as_deref().is_some_and(|e| e != s("event"))
            || f.user.as_deref().is_some_and(|u| u != s("user"))
            || f.database.as_deref().is_some_and(|d| d != s("database"))
        {
            continue;
        }
        if let Some(since) = f.since {
            match humantime::parse_rfc3339(s("time")) {
                Ok(t) if t >= since => {}
                _ => continue,
            }
        }
        let reference = if !s("held_id").is_empty() {
            s("held_id").to_string()
        } else {
            s("token_id").to_string()
        };
        let what = [s("sql"), s("reason"), s("outcome"), s("detail")]
            .into_iter()
            .filter(|x| !x.is_empty())
            .collect::<Vec<_>>()
            .join(" · ");
        let what: String = what.replace('\n', " ").chars().take(100).collect();
        let _ = writeln!(
            out,
            "{:>6}  {:27}  {:13}  {:12}  {:12}  {:36}  {what}",
            v["seq"].as_u64().unwrap_or(0),
            s("time"),
            s("event"),
            s("user"),
            s("database"),
            reference
        );
        n += 1;
    }
    let _ = writeln!(out, "({n} records)");
    Ok(out)
}

/// Loads a keyring for verification.
pub fn keyring(path: &Path) -> Result<Keyring, crate::token::signed::KeyringError> {
    Keyring::load(path)
}

#[cfg(test)]
#[path = "audit_tool_tests.rs"]
mod tests;
