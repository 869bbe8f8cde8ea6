//! Prepared-statement and portal names: what a name means right now, from what the server confirmed and what
//! is still pending in the expected-response queue (see the module docs of [`super`]).

use std::collections::HashMap;

use super::expect::{Effect, Expect, StmtInfo};
use super::SessionState;

impl SessionState {
    /// What a statement name means right now (see the module docs for pending names).
    pub(super) fn lookup_statement(
        &self,
        name: &[u8],
        local: &HashMap<Vec<u8>, Option<StmtInfo>>,
    ) -> StmtInfo {
        if let Some(v) = local.get(name) {
            return v
                .clone()
                .unwrap_or_else(|| StmtInfo::unknown("a deallocated prepared statement"));
        }
        let mut pending: Vec<(Option<u64>, Option<&StmtInfo>)> = Vec::new();
        for e in &self.queue {
            match e {
                Expect::Parse {
                    batch,
                    name: n,
                    info,
                    refused: None,
                } if n == name => pending.push((Some(*batch), Some(info))),
                Expect::Close {
                    batch,
                    kind: b'S',
                    name: n,
                } if n == name => pending.push((Some(*batch), None)),
                // SQL PREPARE/DEALLOCATE in a query string still running: never of the current batch.
                Expect::Query { effects, .. } => {
                    for eff in effects {
                        match eff {
                            Effect::Prepare { name: n, info } if n == name => {
                                pending.push((None, Some(info)))
                            }
                            Effect::Deallocate(Some(n)) if n == name => pending.push((None, None)),
                            Effect::Deallocate(None) | Effect::DiscardAll => {
                                pending.push((None, None))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        self.resolve(pending, self.prepared.get(name), "prepared statement", name)
    }

    pub(super) fn lookup_portal(&self, name: &[u8]) -> StmtInfo {
        let pending = self
            .queue
            .iter()
            .filter_map(|e| match e {
                Expect::Bind {
                    batch,
                    portal,
                    info,
                } if portal == name => Some((Some(*batch), Some(info))),
                Expect::Close {
                    batch,
                    kind: b'P',
                    name: n,
                } if n == name => Some((Some(*batch), None)),
                _ => None,
            })
            .collect();
        self.resolve(pending, self.portals.get(name), "portal", name)
    }

    /// Combines what is pending for a name with what the server confirmed. The latest record of the current
    /// batch decides (if it failed, the server skips the rest of the batch); records of earlier batches are
    /// not settled yet, so the most dangerous of them and the confirmed value counts. `None` records are
    /// removals (Close, DEALLOCATE): the name would be unknown.
    pub(super) fn resolve(
        &self,
        pending: Vec<(Option<u64>, Option<&StmtInfo>)>,
        confirmed: Option<&StmtInfo>,
        what: &str,
        name: &[u8],
    ) -> StmtInfo {
        let unknown = || {
            StmtInfo::unknown(&format!(
                "unknown {what} {:?}",
                String::from_utf8_lossy(name)
            ))
        };
        if let Some((_, rec)) = pending.iter().rev().find(|(b, _)| *b == Some(self.batch)) {
            return rec.cloned().unwrap_or_else(unknown);
        }
        if pending.is_empty() {
            return confirmed.cloned().unwrap_or_else(unknown);
        }
        pending
            .iter()
            .map(|(_, r)| *r)
            .chain([confirmed])
            .map(|r| r.cloned().unwrap_or_else(unknown))
            .max_by_key(|i| i.class)
            .unwrap_or_else(unknown)
    }
}
