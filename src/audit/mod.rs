//! The audit log: `<state_dir>/audit.jsonl`, one JSON object per line, hash-chained (DESIGN.md "Audit log").
//!
//! Each record has `seq` (from 1), `time` (RFC 3339 UTC with microseconds), `event`, the event's fields, and
//! `prev` = `sha256:` + hex of SHA-256 over the previous line's bytes (64 zeros for the first). When the
//! current file grows past the rotation size it is renamed to `audit.000001.jsonl`, `audit.000002.jsonl`, …
//! (numbered upward, never renumbered) and a new `audit.jsonl` continues the chain.
//!
//! Opening the log locks the state directory (`stepgate.lock`): a second instance on it refuses to start.
//! A last line cut short by a crash is truncated away at open and a `recovered` record says so. A log that
//! is not a regular file (a symlink to `/dev/full`, say) is not read; writes to it fail, and the gate then
//! refuses guarded statements.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub mod event;
pub mod repair;

pub use event::{AuditEvent, ReasonCode, SessionFields};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use thiserror::Error;

pub const GENESIS: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// Default size at which `audit.jsonl` is rotated.
pub const DEFAULT_ROTATE_SIZE: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the state directory {0} is in use by another stepgate (its stepgate.lock is held)")]
    Locked(String),
    #[error("audit log {path} is unusable until an operator repairs it: {why}")]
    Unusable { path: String, why: String },
}

struct Tail {
    file: File,
    seq: u64,
    prev: String,
    size: u64,
    /// Number of the next rotated file.
    next_rotation: u64,
    /// Set when a failed append could not be cut back: the file may end in part of a record, and nothing
    /// more is appended after it.
    unusable: Option<String>,
    /// Why the last append failed; cleared by the next one that succeeds.
    last_error: Option<String>,
}

/// An append-only, hash-chained JSON Lines log. Appends are serialized; each is one `write` of a whole line.
pub struct AuditLog {
    dir: PathBuf,
    path: PathBuf,
    rotate_size: u64,
    tail: Mutex<Tail>,
    _lock: File,
    /// Added to every fsync: a slow disk, simulated (tests).
    sync_delay: std::time::Duration,
}

/// `sha256:` + lowercase hex of SHA-256 of `bytes`.
pub fn hash_line(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    format!("sha256:{}", hex(&digest))
}

/// Lowercase hex of `bytes`: the one hex encoder (hashes, ids).
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Current time as RFC 3339 UTC with microseconds.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ts = humantime::format_rfc3339_micros(std::time::UNIX_EPOCH + now);
    ts.to_string()
}

/// The number of a rotated file (`audit.000042.jsonl` → 42).
fn rotation_number(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("audit.")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// The log files of a state directory in chain order: rotated files by number, then `audit.jsonl`.
pub fn log_files(state_dir: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(u64, PathBuf)> = std::fs::read_dir(state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((rotation_number(&e.path())?, e.path())))
        .collect();
    rotated.sort();
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    let current = state_dir.join("audit.jsonl");
    if current.exists() {
        out.push(current);
    }
    out
}

/// The last complete line of a file (for continuing the chain), if any.
fn last_line(path: &Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    let body = bytes.strip_suffix(b"\n")?;
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    Some(body[start..].to_vec())
}

impl AuditLog {
    /// Opens the log in `state_dir` with the default rotation size.
    pub fn open(state_dir: &Path) -> Result<AuditLog, AuditError> {
        Self::open_with(state_dir, DEFAULT_ROTATE_SIZE)
    }

    /// Locks the state directory, opens (creating, mode 0600) `audit.jsonl`, cuts a torn last record and
    /// continues the chain from the last record of the newest file.
    pub fn open_with(state_dir: &Path, rotate_size: u64) -> Result<AuditLog, AuditError> {
        let path = state_dir.join("audit.jsonl");
        let err = |p: &Path| {
            let p = p.display().to_string();
            move |source| AuditError::Io { path: p, source }
        };
        let lock_path = state_dir.join("stepgate.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(AuditError::Locked(state_dir.display().to_string()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(err(&lock_path)(e)),
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(&path)
            .map_err(err(&path))?;
        let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
        let mut torn = 0u64;
        let mut size = 0u64;
        if regular {
            let mut bytes = Vec::new();
            (&file).read_to_end(&mut bytes).map_err(err(&path))?;
            let keep = match bytes.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => 0,
            };
            if keep < bytes.len() {
                torn = (bytes.len() - keep) as u64;
                file.set_len(keep as u64).map_err(err(&path))?;
                file.sync_all().map_err(err(&path))?;
            }
            size = keep as u64;
        }
        let files = log_files(state_dir);
        let next_rotation = files
            .iter()
            .filter_map(|p| rotation_number(p))
            .max()
            .unwrap_or(0)
            + 1;
        let (mut seq, mut prev) = (0, GENESIS.to_string());
        let newest = if regular && size > 0 {
            Some(path.clone())
        } else {
            files.iter().rev().find(|p| **p != path).cloned()
        };
        if let Some(line) = newest.as_deref().and_then(last_line) {
            if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                seq = v["seq"].as_u64().unwrap_or(0);
            }
            prev = hash_line(&line);
        }
        let log = AuditLog {
            dir: state_dir.to_path_buf(),
            path,
            rotate_size,
            tail: Mutex::new(Tail {
                file,
                seq,
                prev,
                size,
                next_rotation,
                unusable: None,
                last_error: None,
            }),
            _lock: lock,
            sync_delay: std::time::Duration::ZERO,
        };
        if torn > 0 {
            log.write(
                &AuditEvent::Recovered {
                    bytes: torn,
                    reason: format!("the last record was cut short ({torn} bytes, no newline) and was removed at start-up"),
                },
                true,
            )?;
            tracing::warn!(bytes = torn, "audit log: a torn last record was cut");
        }
        Ok(log)
    }

    /// Makes every fsync take `delay` longer, as a slow disk would (for tests of what waits for the disk).
    pub fn with_sync_delay(mut self, delay: std::time::Duration) -> AuditLog {
        self.sync_delay = delay;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state directory the log lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `(seq, hash)` of the last record: the head operators record elsewhere.
    pub fn head(&self) -> (u64, String) {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        (tail.seq, tail.prev.clone())
    }

    /// Appends one event; returns its `seq`. `sync` also fsyncs it.
    pub fn write(&self, event: &AuditEvent, sync: bool) -> Result<u64, AuditError> {
        let fields = match serde_json::to_value(event) {
            Ok(Value::Object(m)) => m,
            // Every variant serialises to an object; anything else would be a bug, recorded as one.
            _ => Map::from_iter([("event".to_string(), Value::from(event.name()))]),
        };
        self.append_record(fields, sync)
    }

    /// A record with any event name and fields: for tests that need records stepgate never writes.
    #[cfg(test)]
    pub(crate) fn append(
        &self,
        event: &str,
        mut fields: Map<String, Value>,
        sync: bool,
    ) -> Result<u64, AuditError> {
        fields.insert("event".into(), event.into());
        self.append_record(fields, sync)
    }

    /// Why the log cannot be written now (its last append failed, or it is unusable), or None.
    pub fn unavailable(&self) -> Option<String> {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.unusable.clone().or_else(|| tail.last_error.clone())
    }

    /// Appends one record made of `fields` (with its `event`), numbered, timed and chained.
    fn append_record(&self, fields: Map<String, Value>, sync: bool) -> Result<u64, AuditError> {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let result = self.append_locked(&mut tail, fields, sync);
        tail.last_error = result.as_ref().err().map(|e| e.to_string());
        result
    }

    fn append_locked(
        &self,
        tail: &mut Tail,
        fields: Map<String, Value>,
        sync: bool,
    ) -> Result<u64, AuditError> {
        let seq = tail.seq + 1;
        let mut record = Map::new();
        record.insert("seq".into(), seq.into());
        record.insert("time".into(), now_rfc3339().into());
        for (k, v) in fields {
            record.insert(k, v);
        }
        record.insert("prev".into(), tail.prev.clone().into());
        let mut line = serde_json::to_vec(&Value::Object(record)).unwrap_or_default();
        let hash = hash_line(&line);
        line.push(b'\n');
        let err = |source| AuditError::Io {
            path: self.path.display().to_string(),
            source,
        };
        // A log whose file was removed or replaced under us (state directory deleted, log moved away)
        // would swallow records into an unlinked inode: refuse instead, so guarded statements are refused.
        if let Some(why) = &tail.unusable {
            return Err(AuditError::Unusable {
                path: self.path.display().to_string(),
                why: why.clone(),
            });
        }
        if !self.still_in_place(&tail.file) {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the open audit log is no longer at its path (removed or replaced)",
            )));
        }
        // All or nothing: a failed or short write, or a failed fsync after a whole one, is cut back to the
        // end of the last whole record before anything else happens (the sequence and the chain head have
        // not moved, so the next record would otherwise repeat a number, or be glued onto part of one).
        let end = tail.size;
        if let Err(e) = tail.file.write_all(&line) {
            self.cut_back(tail, end, &e);
            return Err(err(e));
        }
        if sync {
            if !self.sync_delay.is_zero() {
                std::thread::sleep(self.sync_delay);
            }
            if let Err(e) = tail.file.sync_data() {
                self.cut_back(tail, end, &e);
                return Err(err(e));
            }
        }
        tail.seq = seq;
        tail.prev = hash;
        tail.size += line.len() as u64;
        if tail.size >= self.rotate_size {
            self.rotate(tail)?;
        }
        Ok(seq)
    }

    /// Cuts the current file back to `end` (the end of its last whole record) after a failed append, and makes
    /// that durable. If even that fails, the log is marked unusable: nothing more is appended (guarded
    /// statements are refused) until an operator repairs it. A log that is not a regular file has nothing to
    /// cut, nor has one the failed write left as it was (a file made immutable, say: once it is writable
    /// again, appends go on without a restart).
    fn cut_back(&self, tail: &mut Tail, end: u64, cause: &std::io::Error) {
        match tail.file.metadata() {
            Ok(m) if m.is_file() && m.len() == end => {
                tracing::warn!(error = %cause, "audit append failed; nothing of it reached the log");
                return;
            }
            Ok(m) if m.is_file() => {}
            _ => return,
        }
        match tail.file.set_len(end).and_then(|_| tail.file.sync_data()) {
            Ok(()) => {
                tracing::warn!(error = %cause, bytes = end, "audit append failed; the log was cut back to its last whole record")
            }
            Err(e) => {
                let why = format!(
                    "an append failed ({cause}) and cutting it back to {end} bytes failed too ({e})"
                );
                tracing::error!(path = %self.path.display(), "{why}; the audit log is unusable until an operator repairs it");
                tail.unusable = Some(why);
            }
        }
    }

    /// Whether `file` is still the file at the log's path (same device and inode). A log that is not a
    /// regular file (e.g. `/dev/full`) is judged by its own writes.
    fn still_in_place(&self, file: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(&self.path)) {
            (Ok(open), _) if !open.is_file() => true,
            (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
            _ => false,
        }
    }

    /// Renames the full `audit.jsonl` to the next `audit.NNNNNN.jsonl` and starts a new one.
    fn rotate(&self, tail: &mut Tail) -> Result<(), AuditError> {
        let err = |source| AuditError::Io {
            path: self.path.display().to_string(),
            source,
        };
        tail.file.sync_all().map_err(err)?;
        let target = self
            .dir
            .join(format!("audit.{:06}.jsonl", tail.next_rotation));
        std::fs::rename(&self.path, &target).map_err(err)?;
        tail.file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(err)?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        tail.next_rotation += 1;
        tail.size = 0;
        tracing::info!(file = %target.display(), "audit log rotated");
        Ok(())
    }

    /// Every record of one file, oldest first. A file that is not a regular file reads as empty.
    pub fn read_all(path: &Path) -> Result<Vec<Value>, AuditError> {
        let err = |source| AuditError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(err(e)),
        };
        if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(err)?;
            if let Ok(v) = serde_json::from_str(&line) {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Token ids named anywhere in the damaged lines of a state directory's logs (lines that are not whole
    /// JSON records: bytes glued together by a failed write, a changed byte). Conservatively, every use of
    /// such a token counts as spent: a record of it that cannot be read may be the one that spent it.
    pub fn damaged_token_ids(state_dir: &Path) -> Result<Vec<String>, AuditError> {
        const KEY: &[u8] = b"\"token_id\":\"";
        let mut ids = Vec::new();
        // Parts moved aside by `audit repair` count whole: their records were never read back.
        let aside: Vec<PathBuf> = std::fs::read_dir(state_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("damaged.") && n.ends_with(".bin"))
            })
            .collect();
        let files: Vec<(PathBuf, bool)> = log_files(state_dir)
            .into_iter()
            .map(|p| (p, false))
            .chain(aside.into_iter().map(|p| (p, true)))
            .collect();
        for (path, whole) in files {
            let file = match File::open(&path) {
                Ok(f) if f.metadata().map(|m| m.is_file()).unwrap_or(false) => f,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(AuditError::Io {
                        path: path.display().to_string(),
                        source,
                    })
                }
            };
            let mut bytes = Vec::new();
            (&file)
                .read_to_end(&mut bytes)
                .map_err(|source| AuditError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
            for line in bytes.split(|&b| b == b'\n') {
                if line.is_empty() || !whole && serde_json::from_slice::<Value>(line).is_ok() {
                    continue;
                }
                let mut rest = line;
                while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
                    rest = &rest[at + KEY.len()..];
                    let end = rest.iter().position(|&b| b == b'"').unwrap_or(rest.len());
                    if end > 0 && end <= 128 {
                        ids.push(String::from_utf8_lossy(&rest[..end]).into_owned());
                    }
                    rest = &rest[end..];
                }
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Every record of a state directory, across rotated files, oldest first.
    pub fn read_dir(state_dir: &Path) -> Result<Vec<Value>, AuditError> {
        let mut out = Vec::new();
        for f in log_files(state_dir) {
            out.extend(Self::read_all(&f)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
