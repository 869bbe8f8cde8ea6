//! Unit tests of `audit` (kept in their own file).

use super::*;

#[test]
fn chain_continues_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    let mut f = Map::new();
    f.insert("sql".into(), "DROP TABLE t".into());
    assert_eq!(log.append("held", f.clone(), false).unwrap(), 1);
    drop(log);
    let log = AuditLog::open(dir.path()).unwrap();
    assert_eq!(log.append("held", f, true).unwrap(), 2);
    let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let second: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(second["prev"], hash_line(lines[0].as_bytes()));
    let first: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first["prev"], GENESIS);
    let mode = std::fs::metadata(dir.path().join("audit.jsonl"))
        .unwrap()
        .permissions();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.mode() & 0o777, 0o600);
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_second_instance_on_the_same_state_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = AuditLog::open(dir.path()).unwrap();
    let err = AuditLog::open(dir.path()).err().unwrap();
    assert!(matches!(err, AuditError::Locked(_)), "{err}");
    assert!(err.to_string().contains("in use by another stepgate"));
    drop(first);
    AuditLog::open(dir.path()).unwrap();
}

#[test]
fn a_torn_last_record_is_cut_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    log.append("held", Map::new(), true).unwrap();
    drop(log);
    let path = dir.path().join("audit.jsonl");
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"seq\":2,\"time\":\"2026-").unwrap();
    drop(f);
    let log = AuditLog::open(dir.path()).unwrap();
    assert_eq!(log.head().0, 2);
    let l = lines(&path);
    assert_eq!(l.len(), 2);
    let rec: Value = serde_json::from_str(&l[1]).unwrap();
    assert_eq!(rec["event"], "recovered");
    assert_eq!(rec["seq"], 2);
    assert_eq!(rec["prev"], hash_line(l[0].as_bytes()));
}

#[test]
fn rotation_keeps_the_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open_with(dir.path(), 300).unwrap();
    for _ in 0..7 {
        let mut f = Map::new();
        f.insert("sql".into(), "x".repeat(100).into());
        log.append("held", f, false).unwrap();
    }
    let head = log.head();
    drop(log);
    let files = log_files(dir.path());
    assert!(files.len() >= 3, "{files:?}");
    assert!(files[0].ends_with("audit.000001.jsonl"));
    let all: Vec<String> = files.iter().flat_map(|f| lines(f)).collect();
    assert_eq!(all.len(), 7);
    let mut prev = GENESIS.to_string();
    for (i, l) in all.iter().enumerate() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["seq"], (i + 1) as u64);
        assert_eq!(v["prev"], prev.as_str());
        prev = hash_line(l.as_bytes());
    }
    assert_eq!(head, (7, prev.clone()));
    // Reopened after a rotation left audit.jsonl empty, the chain continues from the rotated file.
    let log = AuditLog::open_with(dir.path(), 300).unwrap();
    assert_eq!(log.head(), (7, prev));
    assert_eq!(AuditLog::read_dir(dir.path()).unwrap().len(), 7);
}

#[test]
fn dev_full_makes_appends_fail() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/full", dir.path().join("audit.jsonl")).unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    assert!(log.append("held", Map::new(), true).is_err());
    assert!(AuditLog::read_dir(dir.path()).unwrap().is_empty());
}

#[test]
fn a_removed_state_directory_makes_appends_fail() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let log = AuditLog::open(&dir).unwrap();
    log.append("held", Map::new(), true).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let err = log.append("held", Map::new(), true).unwrap_err();
    assert!(err.to_string().contains("no longer at its path"), "{err}");
}
