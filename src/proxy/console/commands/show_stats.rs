//! `SHOW STATS`: counters, and the audit head (seq:hash) to record elsewhere.

use std::sync::atomic::Ordering::Relaxed;

use crate::classify::Class;
use crate::metrics::Outcome;
use crate::proxy::console::command::{Command, Ctx};
use crate::proxy::console::result::{ConsoleError, Table};

pub struct ShowStats;
pub(crate) static COMMAND: ShowStats = ShowStats;

impl Command for ShowStats {
    fn words(&self) -> &'static [&'static str] {
        &["SHOW", "STATS"]
    }
    fn help(&self) -> &'static str {
        "counters and the audit head (seq:hash) to record elsewhere"
    }
    fn order(&self) -> u32 {
        50
    }
    fn columns(&self, _: &[String]) -> &'static [&'static str] {
        &["field", "value"]
    }
    fn run(&self, cx: &Ctx<'_>, _: &[String]) -> Result<Table, ConsoleError> {
        let gate = cx.gate;
        let m = &gate.metrics;
        let sum = |o: Outcome| -> u64 { Class::ALL.iter().map(|c| m.statements(*c, o)).sum() };
        let head = gate
            .audit
            .as_ref()
            .map(|a| {
                let (seq, hash) = a.head();
                format!("{seq}:{hash}")
            })
            .unwrap_or_default();
        Ok(Table::fields(vec![
            ("sessions_open", m.sessions_open.load(Relaxed).to_string()),
            ("sessions_total", m.sessions_total.load(Relaxed).to_string()),
            ("statements_passed", sum(Outcome::Pass).to_string()),
            ("statements_held", sum(Outcome::Held).to_string()),
            ("statements_observed", sum(Outcome::Observed).to_string()),
            ("statements_authorized", sum(Outcome::Authorized).to_string()),
            ("held_entries", gate.registry.len().to_string()),
            ("audit_write_failures", m.audit_write_failures.load(Relaxed).to_string()),
            ("upstream_connect_failures", m.upstream_connect_failures.load(Relaxed).to_string()),
            ("policy_generation", gate.generation.to_string()),
            ("audit_head", head),
            (
                "audit_log",
                match gate.audit.as_ref().and_then(|a| a.unavailable()) {
                    None => "ok".to_string(),
                    Some(why) => format!("UNAVAILABLE (guarded statements are refused): {why}"),
                },
            ),
        ]))
    }
}
