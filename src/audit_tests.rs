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
