//! The audit log: `<state_dir>/audit.jsonl`, one JSON object per line, hash-chained (DESIGN.md "Audit log").
//!
//! Each record has `seq` (from 1), `time` (RFC 3339 UTC with microseconds), `event`, the event's fields, and
//! `prev` = `sha256:` + hex of SHA-256 over the previous line's bytes (64 zeros for the first). This module
//! appends records; the gate writes `held` and `observed` events today.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use thiserror::Error;

pub const GENESIS: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

struct Tail {
    file: File,
    seq: u64,
    prev: String,
}

/// An append-only, hash-chained JSON Lines log. Appends are serialized; each is one `write` of a whole line.
pub struct AuditLog {
    path: PathBuf,
    tail: Mutex<Tail>,
}

/// `sha256:` + lowercase hex of SHA-256 of `bytes`.
pub fn hash_line(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
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

impl AuditLog {
    /// Opens (creating, mode 0600) the log in `state_dir` and reads its last record to continue the chain.
    pub fn open(state_dir: &Path) -> Result<AuditLog, AuditError> {
        let path = state_dir.join("audit.jsonl");
        let err = |source| AuditError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        let (mut seq, mut prev) = (0, GENESIS.to_string());
        for line in BufReader::new(File::open(&path).map_err(err)?).split(b'\n') {
            let line = line.map_err(err)?;
            if line.is_empty() {
                continue;
            }
            if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                seq = v["seq"].as_u64().unwrap_or(seq + 1);
            }
            prev = hash_line(&line);
        }
        Ok(AuditLog {
            path,
            tail: Mutex::new(Tail { file, seq, prev }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record with `event` and `fields`; returns its `seq`. `sync` also fsyncs it.
    pub fn append(
        &self,
        event: &str,
        fields: Map<String, Value>,
        sync: bool,
    ) -> Result<u64, AuditError> {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let seq = tail.seq + 1;
        let mut record = Map::new();
        record.insert("seq".into(), seq.into());
        record.insert("time".into(), now_rfc3339().into());
        record.insert("event".into(), event.into());
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
        tail.file.write_all(&line).map_err(err)?;
        if sync {
            tail.file.sync_data().map_err(err)?;
        }
        tail.seq = seq;
        tail.prev = hash;
        Ok(seq)
    }

    /// Every record, oldest first (for rebuilding state at start-up and for tools).
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
        let mut out = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(err)?;
            if let Ok(v) = serde_json::from_str(&line) {
                out.push(v);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
