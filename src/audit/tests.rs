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
    let log = reopen(dir.path());
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
    reopen(dir.path());
}

/// Opens the log again after the previous handle was dropped. The lock is an flock on a file the handle
/// opened: a process another test forks at that moment holds the lock until it execs, so a reopen may have
/// to wait a moment.
fn reopen(dir: &std::path::Path) -> AuditLog {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match AuditLog::open(dir) {
            Err(AuditError::Locked(_)) if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            r => return r.unwrap(),
        }
    }
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
    let log = reopen(dir.path());
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
    let log = reopen(dir.path());
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

/// A small tmpfs mounted for one test (root only), unmounted when dropped.
struct SmallDisk {
    at: std::path::PathBuf,
    // Removed after the unmount (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("disk");
        std::fs::create_dir(&at).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk { at, _dir: dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.at).status();
    }
}

fn pad(n: usize) -> Map<String, Value> {
    let mut f = Map::new();
    f.insert("sql".into(), "x".repeat(n).into());
    f
}

/// The fault of issue 16: the disk fills up in the middle of an append. The partial record is cut away at
/// once, nothing is glued onto it later, and the chain goes on intact once there is room again.
#[test]
fn a_partial_append_on_a_full_disk_is_cut_back_and_the_chain_goes_on() {
    let Some(disk) = SmallDisk::mount("64k") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let log = AuditLog::open(&disk.at).unwrap();
    let size = |log: &AuditLog| std::fs::metadata(log.path()).unwrap().len();
    // Bring the file's end to about 200 bytes before a page boundary, so the next record fits only in part.
    log.append("held", pad(0), false).unwrap();
    let before = size(&log);
    log.append("held", pad(0), false).unwrap();
    let base = (size(&log) - before) as usize;
    let at = (size(&log) % 4096) as usize;
    let want = (3900 + 4096 - at) % 4096;
    log.append(
        "held",
        pad(want.saturating_sub(base) + if want < base { 4096 } else { 0 }),
        false,
    )
    .unwrap();
    let end = size(&log);
    let free_in_page = 4096 - end % 4096;
    assert!((100..400).contains(&free_in_page), "{end}");
    // Fill every other page of the disk.
    let mut filler = std::fs::File::create(disk.at.join("filler")).unwrap();
    while std::io::Write::write_all(&mut filler, &[0u8; 4096]).is_ok() {}
    drop(filler);

    let err = log.append("held", pad(1000), true).unwrap_err();
    assert!(err.to_string().contains("No space left"), "{err}");
    assert_eq!(size(&log), end, "the partial record is still in the file");
    std::fs::remove_file(disk.at.join("filler")).unwrap();
    let seq = log.append("held", pad(1000), true).unwrap();
    assert_eq!(seq, 4, "the failed append took no number");
    let records = AuditLog::read_all(log.path()).unwrap();
    assert_eq!(records.len(), 4, "every line is one whole record");
    let report = crate::audit_tool::verify(&[log.path().to_path_buf()], None, None).unwrap();
    assert!(report.ok, "{:?}", report.error);
}

/// Bytes that are not a whole record (glued by an old failed write, or changed) still spend the tokens they
/// name: every use, whatever the record was.
#[test]
fn a_token_named_in_damaged_bytes_is_spent() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    let mut f = Map::new();
    f.insert("token_id".into(), "ok-token".into());
    log.append("token_set", f, false).unwrap();
    drop(log);
    let mut bytes = std::fs::read(dir.path().join("audit.jsonl")).unwrap();
    bytes.extend_from_slice(b"{\"seq\":2,\"event\":\"held\",\"sq{\"seq\":2,\"event\":\"authorized\",\"token_id\":\"glued-token\",\"fingerprint\":\"sha256:ab\"}\n");
    std::fs::write(dir.path().join("audit.jsonl"), bytes).unwrap();
    let ids = AuditLog::damaged_token_ids(dir.path()).unwrap();
    assert_eq!(ids, vec!["glued-token".to_string()]);
    let ledger = crate::token::Ledger::default();
    ledger.burn("glued-token");
    assert!(!ledger.reserve("glued-token", "sha256:ab", 5));
    assert!(ledger.reserve("ok-token", "sha256:ab", 1));
}
