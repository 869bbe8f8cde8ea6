//! The audit log's vocabulary is one truth: the events and reason codes in the code (`AuditEvent`,
//! `ReasonCode`), the README's tables, and — where the design document is at hand (`../shared/DESIGN.md`,
//! or `STEPGATE_DESIGN`) — its lists, each way round. Every event also survives a write and a read back.

use std::collections::BTreeSet;

use stepgate::audit::event::{AuditEvent, Held, Signer, Use};
use stepgate::audit::{ReasonCode, SessionFields};
use stepgate::classify::Class;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// Backticked names in the first column of table rows of `section` (up to the next `## `).
fn first_column(doc: &str, section: &str) -> BTreeSet<String> {
    let start = doc
        .find(section)
        .unwrap_or_else(|| panic!("no section {section:?}"));
    let rest = &doc[start + section.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    let mut out = BTreeSet::new();
    for line in rest[..end].lines() {
        let Some(cell) = line.strip_prefix("| ").and_then(|l| l.split(" |").next()) else {
            continue;
        };
        for part in cell.split('`').skip(1).step_by(2) {
            let name = part.split_whitespace().next().unwrap_or_default();
            if !name.is_empty() && name != "code" && name != "event" {
                out.insert(name.to_string());
            }
        }
    }
    out
}

fn code_events() -> BTreeSet<String> {
    AuditEvent::NAMES.iter().map(|s| s.to_string()).collect()
}

fn code_reasons() -> BTreeSet<String> {
    ReasonCode::ALL
        .iter()
        .map(|r| r.as_str().to_string())
        .collect()
}

#[test]
fn the_readme_lists_every_event_and_reason_code_and_no_other() {
    let doc = readme();
    assert_eq!(first_column(&doc, "## Audit log"), code_events());
    assert_eq!(first_column(&doc, "| code | meaning |"), code_reasons());
}

/// Names in a DESIGN.md list that starts with `label` and ends at the next `.` that closes a sentence
/// (a period followed by a newline or a space and a capital).
fn design_list(doc: &str, label: &str) -> BTreeSet<String> {
    let start = doc
        .find(label)
        .unwrap_or_else(|| panic!("DESIGN.md has no {label:?}"));
    let rest = &doc[start + label.len()..];
    let end = rest.find(".\n").unwrap_or(rest.len());
    let text = rest[..end].replace('\n', " ");
    let mut out = BTreeSet::new();
    for item in text.split([',', '/']) {
        // "authorized (use reserved)": the name is the first word; skip words inside parentheses.
        let item = item.trim();
        let name: String = item
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !name.is_empty() && !item.starts_with('(') {
            out.insert(name);
        }
    }
    out
}

#[test]
fn the_design_document_and_the_code_agree() {
    let path = std::env::var("STEPGATE_DESIGN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/DESIGN.md").to_string()
    });
    let Ok(doc) = std::fs::read_to_string(&path) else {
        eprintln!("{path} not found: the README tables are the contract checked here");
        return;
    };
    let design_events = design_list(&doc, "Events: ");
    let mut code = code_events();
    // stepgate's addition to the design's list, documented in the README.
    code.remove("gate_disabled");
    assert_eq!(design_events, code, "events: DESIGN.md vs AuditEvent");
    let design_reasons = design_list(
        &doc,
        "Reason codes, in the refusal's DETAIL and the audit log: ",
    );
    assert_eq!(
        design_reasons,
        code_reasons(),
        "reason codes: DESIGN.md vs ReasonCode"
    );
}

fn session() -> SessionFields {
    SessionFields {
        user: "app".into(),
        database: "prod".into(),
        client_addr: "10.0.0.1".into(),
        application_name: "psql".into(),
        session_id: 7,
    }
}

fn one_of_each() -> Vec<AuditEvent> {
    let used = Use {
        session: session(),
        sql: "DROP TABLE t".into(),
        fingerprint: "sha256:ab".into(),
        class: Class::Destructive,
        token_id: "t1".into(),
        signers: vec![Signer {
            fingerprint: "0B7F".into(),
            user_id: "Alice <a@example.com>".into(),
            name: "alice".into(),
        }],
    };
    let held = Held {
        session: session(),
        held_id: "abcd1234".into(),
        sql: "DROP TABLE t".into(),
        fingerprint: "sha256:ab".into(),
        fingerprints: vec!["sha256:ab".into()],
        statements: vec!["DROP TABLE t".into()],
        class: Class::Destructive,
        reason: "destructive is guarded".into(),
    };
    vec![
        AuditEvent::Held(held.clone()),
        AuditEvent::Observed(held),
        AuditEvent::Refused {
            session: session(),
            sql: "SET x".into(),
            reason: "names a stepgate setting".into(),
        },
        AuditEvent::TokenSet {
            session: session(),
            token_id: "t1".into(),
            signers: used.signers.clone(),
            not_after: "2026-12-02T12:00:00Z".into(),
            token: "-----BEGIN PGP SIGNED MESSAGE-----".into(),
        },
        AuditEvent::TokenRejected {
            session: session(),
            reason: ReasonCode::TokenExpired,
            detail: "token_expired".into(),
            token_sha256: "sha256:cd".into(),
        },
        AuditEvent::Authorized(used.clone()),
        AuditEvent::Executed {
            used: used.clone(),
            outcome: "DROP TABLE".into(),
        },
        AuditEvent::Released {
            used: used.clone(),
            reason: "server error".into(),
        },
        AuditEvent::Committed(used.clone()),
        AuditEvent::RolledBack(used.clone()),
        AuditEvent::PolicyReloaded {
            config: "stepgate.toml".into(),
            outcome: "applied".into(),
            generation: Some(2),
            signers: Some(1),
            restart_needed: vec!["listen".into()],
            error: None,
        },
        AuditEvent::AdminAction {
            user: "dba".into(),
            client_addr: "10.0.0.2".into(),
            command: "DISMISS abcd1234".into(),
            outcome: "ok".into(),
            held_id: Some("abcd1234".into()),
        },
        AuditEvent::Recovered {
            bytes: 12,
            reason: "torn".into(),
        },
        AuditEvent::GateDisabled {
            reason: "--unsafe-no-gate".into(),
        },
        AuditEvent::Approved {
            user: "dba".into(),
            token_id: "t2".into(),
            signers: used.signers.clone(),
            token: "…".into(),
        },
        AuditEvent::Allowed {
            session: session(),
            sql: "CREATE TABLE IF NOT EXISTS x ()".into(),
            fingerprint: "sha256:ef".into(),
            class: Class::Ddl,
        },
        AuditEvent::Repaired {
            file: "audit.jsonl".into(),
            bytes: 40,
            reason: "not a JSON record".into(),
        },
    ]
}

#[test]
fn every_event_is_written_with_its_name_and_reads_back_the_same() {
    let events = one_of_each();
    let names: BTreeSet<String> = events.iter().map(|e| e.name().to_string()).collect();
    assert_eq!(names, code_events(), "one_of_each must cover every event");
    let dir = tempfile::tempdir().unwrap();
    let log = stepgate::audit::AuditLog::open(dir.path()).unwrap();
    for e in &events {
        log.write(e, false).unwrap();
    }
    drop(log);
    let records = stepgate::audit::AuditLog::read_dir(dir.path()).unwrap();
    assert_eq!(records.len(), events.len());
    for (r, e) in records.iter().zip(&events) {
        assert_eq!(r["event"], e.name());
        // Session fields are flat, as DESIGN.md says.
        if r.get("session_id").is_some() {
            assert_eq!(r["user"], "app");
        }
        let back: AuditEvent = serde_json::from_value(r.clone()).unwrap();
        assert_eq!(&back, e);
    }
}
