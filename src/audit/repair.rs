//! Damage in the middle of the log, found and moved aside.
//!
//! A torn *last* line is a crash during an append and is cut at start-up ([`super::AuditLog::open`]). Damage
//! anywhere else — a line that is not a whole record, a record whose number or `prev` hash does not follow
//! its predecessor — means the evidence can no longer prove what ran: stepgate does not start on it.
//! `stepgate audit repair` moves everything from the first damaged line on aside into
//! `damaged.<unix time>.bin` in the state directory (nothing is deleted), continues the chain from the
//! last good record with a `repaired` record that names the file, and the spent token uses are rebuilt
//! conservatively: a token named anywhere in bytes moved aside counts as entirely spent
//! ([`super::AuditLog::damaged_token_ids`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{hash_line, log_files, AuditError, AuditEvent, AuditLog, GENESIS};

/// Where the log stops being whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: usize,
    /// Byte offset of that line in `file`.
    pub offset: u64,
    pub problem: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} line {}: {}",
            self.file.display(),
            self.line,
            self.problem
        )
    }
}

/// What `repair` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repaired {
    pub damage: Damage,
    /// The file the damaged part was moved into.
    pub aside: PathBuf,
    pub bytes: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The first place the logs of `state_dir` are not a whole chain (a torn last line aside), or None.
pub fn damage(state_dir: &Path) -> Result<Option<Damage>, AuditError> {
    let files = log_files(state_dir);
    let (mut seq, mut prev) = (0u64, GENESIS.to_string());
    for (fi, path) in files.iter().enumerate() {
        // Not a regular file (a symlink to /dev/full): nothing to check (and nothing to read).
        if !path.metadata().is_ok_and(|m| m.is_file()) {
            continue;
        }
        let bytes = std::fs::read(path).map_err(io(path))?;
        let last_file = fi + 1 == files.len();
        let mut offset = 0u64;
        let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let at = offset;
            offset += line.len() as u64 + 1;
            let is_tail = i + 1 == lines.len();
            if line.is_empty() && is_tail {
                break;
            }
            if is_tail && last_file {
                // A torn last line: AuditLog::open cuts it.
                break;
            }
            let damaged = |problem: String| Damage {
                file: path.clone(),
                line: i + 1,
                offset: at,
                problem,
            };
            let Ok(record) = serde_json::from_slice::<Value>(line) else {
                return Ok(Some(damaged("not a whole JSON record".into())));
            };
            if record["seq"].as_u64() != Some(seq + 1) {
                return Ok(Some(damaged(format!(
                    "record number {} where {} was due",
                    record["seq"],
                    seq + 1
                ))));
            }
            if record["prev"].as_str() != Some(prev.as_str()) {
                return Ok(Some(damaged(
                    "its prev hash does not match the record before it".into(),
                )));
            }
            seq += 1;
            prev = hash_line(line);
        }
    }
    Ok(None)
}

/// Moves the damaged part of the logs aside and continues the chain with a `repaired` record. None if
/// there was nothing to repair. The state directory must not be in use (its lock is taken).
pub fn repair(state_dir: &Path) -> Result<Option<Repaired>, AuditError> {
    // The lock first: no stepgate may be appending meanwhile.
    let lock_path = state_dir.join("stepgate.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(AuditError::Locked(state_dir.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
    }
    let Some(damage) = damage(state_dir)? else {
        return Ok(None);
    };
    let files = log_files(state_dir);
    let from = files.iter().position(|f| *f == damage.file).unwrap_or(0);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = state_dir.join(format!("damaged.{stamp}.bin"));
    let mut out = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&aside)
        .map_err(io(&aside))?;
    let mut moved = 0u64;
    for (i, path) in files.iter().enumerate().skip(from) {
        let bytes = std::fs::read(path).map_err(io(path))?;
        let part = if i == from {
            &bytes[(damage.offset as usize).min(bytes.len())..]
        } else {
            &bytes[..]
        };
        out.write_all(part).map_err(io(&aside))?;
        moved += part.len() as u64;
    }
    out.sync_all().map_err(io(&aside))?;
    drop(out);
    // The damaged file keeps its whole records; later files went aside with it.
    let cut = std::fs::OpenOptions::new()
        .write(true)
        .open(&damage.file)
        .map_err(io(&damage.file))?;
    cut.set_len(damage.offset).map_err(io(&damage.file))?;
    cut.sync_all().map_err(io(&damage.file))?;
    drop(cut);
    for path in files.iter().skip(from + 1) {
        std::fs::remove_file(path).map_err(io(path))?;
    }
    let current = state_dir.join("audit.jsonl");
    if damage.file != current {
        std::fs::rename(&damage.file, &current).map_err(io(&current))?;
    }
    if let Ok(d) = std::fs::File::open(state_dir) {
        let _ = d.sync_all();
    }
    drop(lock);
    let log = AuditLog::open(state_dir)?;
    log.write(
        &AuditEvent::Repaired {
            file: aside.display().to_string(),
            bytes: moved,
            reason: damage.to_string(),
        },
        true,
    )?;
    Ok(Some(Repaired {
        damage,
        aside,
        bytes: moved,
    }))
}
