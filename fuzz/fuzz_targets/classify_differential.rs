//! Differential: stepgate's classifier against PostgreSQL's parser (libpg_query) on the same text.
//!
//! Fails when
//! - the two disagree on statement boundaries (every stepgate statement must lie inside one of
//!   PostgreSQL's statements, one for one);
//! - PostgreSQL's parser rejects the text and stepgate does not call it `unparsed`;
//! - PostgreSQL's tree holds a statement kind outside the passing ones (SELECT/INSERT/UPDATE/DELETE/
//!   MERGE/transaction/SET/SHOW/…) and stepgate passes it (class below `ddl`);
//! - the shape cache (shared across inputs, so earlier inputs' shapes can collide with later ones) gives
//!   a verdict other than a fresh analysis.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use stepgate::classify::cache::CachedClassifier;
use stepgate::classify::{Class, Classifier, LexSettings};

/// Statement kinds that may pass without a token (the `read`, `write` and `session` classes).
const PASSING_KINDS: &[&str] = &[
    "SelectStmt",
    "InsertStmt",
    "UpdateStmt",
    "DeleteStmt",
    "MergeStmt",
    "CallStmt",
    "CopyStmt",
    "ExplainStmt",
    "TransactionStmt",
    "VariableSetStmt",
    "VariableShowStmt",
    "DiscardStmt",
    "ListenStmt",
    "UnlistenStmt",
    "NotifyStmt",
    "DeallocateStmt",
    "ExecuteStmt",
    "FetchStmt",
    "ClosePortalStmt",
    "ConstraintsSetStmt",
    "PrepareStmt",
    "DeclareCursorStmt",
    "VacuumStmt",
];

fn cache() -> &'static CachedClassifier {
    static C: OnceLock<CachedClassifier> = OnceLock::new();
    C.get_or_init(|| CachedClassifier::new(Classifier::default(), 4096))
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    if sql.contains('\0') || sql.len() > 4096 {
        return;
    }
    let classifier = Classifier::default();
    let settings = LexSettings::default();
    // As the gate reads a query string: decoded in the session encoding first (which may refuse it).
    let ours = stepgate::classify::decode(sql.as_bytes(), &settings)
        .and_then(|_| classifier.analyze(sql, &settings));
    let theirs = pg_query::parse(sql, 0);
    match (&ours, &theirs) {
        (Err(_), _) => {} // unreadable: held as unparsed by the gate
        (Ok(stmts), Err(_)) => {
            assert!(
                stmts.iter().all(|s| s.verdict.class == Class::Unparsed),
                "PostgreSQL rejects {sql:?} but stepgate says {:?}",
                stmts.iter().map(|s| s.verdict.class).collect::<Vec<_>>()
            );
        }
        (Ok(stmts), Ok(parsed)) => {
            let ranges: Vec<(usize, usize, &str)> = parsed
                .protobuf
                .stmts
                .iter()
                .filter_map(|r| {
                    let start = r.stmt_location as usize;
                    let end = if r.stmt_len == 0 {
                        sql.len()
                    } else {
                        start + r.stmt_len as usize
                    };
                    let node = r.stmt.as_ref()?.node.as_ref()?;
                    let kind = serde_json::to_value(node).ok()?;
                    let kind = kind.as_object()?.keys().next()?.clone();
                    Some((start, end, Box::leak(kind.into_boxed_str()) as &str))
                })
                .collect();
            assert_eq!(
                stmts.len(),
                ranges.len(),
                "statement count differs for {sql:?}: {:?}",
                stmts.iter().map(|s| s.text).collect::<Vec<_>>()
            );
            for (s, (start, end, kind)) in stmts.iter().zip(&ranges) {
                assert!(
                    s.start >= *start && s.start + s.text.len() <= *end,
                    "boundary differs for {sql:?}: {:?} vs {}..{}",
                    s.text,
                    start,
                    end
                );
                if !PASSING_KINDS.contains(kind) {
                    assert!(
                        s.verdict.class >= Class::Ddl,
                        "{kind} passed as {} in {sql:?}",
                        s.verdict.class
                    );
                }
            }
        }
    }
    // The cache never disagrees with a fresh analysis.
    let fresh = match &ours {
        Ok(stmts) => stmts
            .iter()
            .map(|s| s.verdict.class)
            .max()
            .unwrap_or(Class::Read),
        Err(_) => Class::Unparsed,
    };
    let cached = cache().lookup(sql.as_bytes(), &settings, 1).max;
    assert_eq!(cached, fresh, "cache disagrees for {sql:?}");
});
