//! Prometheus metrics (`metrics_listen`, `GET /metrics`): sessions, statements by class and decision, held,
//! authorized, token rejections by reason, audit write failures, upstream connect failures, a classification
//! time histogram, and the audit head. Counters are relaxed atomics; rendering reads them without locking.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::audit::ReasonCode;
use crate::classify::Class;

/// What the gate did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Held,
    Observed,
    Authorized,
}

const OUTCOMES: [(Outcome, &str); 4] = [
    (Outcome::Pass, "pass"),
    (Outcome::Held, "held"),
    (Outcome::Observed, "observed"),
    (Outcome::Authorized, "authorized"),
];

/// Upper bounds of the classification histogram, in microseconds.
const BUCKETS_US: [u64; 8] = [1, 5, 10, 50, 100, 500, 1000, 10_000];

#[derive(Debug, Default)]
pub struct Metrics {
    pub sessions_open: AtomicI64,
    pub sessions_total: AtomicU64,
    statements: [[AtomicU64; 4]; 7],
    token_rejections: [AtomicU64; ReasonCode::ALL.len()],
    pub audit_write_failures: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
    pub reloads: AtomicU64,
    classify_buckets: [AtomicU64; 8],
    classify_count: AtomicU64,
    classify_sum_ns: AtomicU64,
}

// `Class` and `Outcome` are fieldless enums declared in the order of `Class::ALL` and `OUTCOMES`: their
// discriminants index the counter arrays directly (no search on the per-message path).
fn class_index(c: Class) -> usize {
    c as usize
}

impl Metrics {
    /// One message judged: its most dangerous class and what was done with it.
    pub fn statement(&self, class: Class, outcome: Outcome) {
        let o = OUTCOMES
            .iter()
            .position(|(x, _)| *x == outcome)
            .unwrap_or(0);
        self.statements[class_index(class)][o].fetch_add(1, Relaxed);
    }

    pub fn token_rejected(&self, code: ReasonCode) {
        self.token_rejections[code.index()].fetch_add(1, Relaxed);
    }

    /// Time spent classifying a message that was not already cached.
    pub fn classified(&self, took: Duration) {
        let us = took.as_micros() as u64;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            if us <= *b {
                self.classify_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.classify_count.fetch_add(1, Relaxed);
        self.classify_sum_ns
            .fetch_add(took.as_nanos() as u64, Relaxed);
    }

    /// How many messages of `class` got `outcome` so far.
    pub fn statements(&self, class: Class, outcome: Outcome) -> u64 {
        let o = OUTCOMES
            .iter()
            .position(|(x, _)| *x == outcome)
            .unwrap_or(0);
        self.statements[class_index(class)][o].load(Relaxed)
    }

    /// The Prometheus text exposition; `head` is the audit log's (seq, hash).
    pub fn render(&self, head: Option<(u64, String)>) -> String {
        let mut s = String::with_capacity(4096);
        let mut put = |name: &str, kind: &str, help: &str, lines: Vec<(String, u64)>| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        put(
            "stepgate_sessions_open",
            "gauge",
            "Client sessions open now.",
            vec![(
                String::new(),
                self.sessions_open.load(Relaxed).max(0) as u64,
            )],
        );
        put(
            "stepgate_sessions_total",
            "counter",
            "Client sessions accepted.",
            vec![(String::new(), self.sessions_total.load(Relaxed))],
        );
        let mut lines = Vec::new();
        for (ci, c) in Class::ALL.iter().enumerate() {
            for (oi, (_, o)) in OUTCOMES.iter().enumerate() {
                lines.push((
                    format!("{{class=\"{}\",decision=\"{o}\"}}", c.as_str()),
                    self.statements[ci][oi].load(Relaxed),
                ));
            }
        }
        put(
            "stepgate_statements_total",
            "counter",
            "Messages judged, by their most dangerous class and the decision.",
            lines,
        );
        let by = |o: Outcome| -> u64 { Class::ALL.iter().map(|c| self.statements(*c, o)).sum() };
        put(
            "stepgate_held_total",
            "counter",
            "Messages held (refused without a covering token).",
            vec![(String::new(), by(Outcome::Held))],
        );
        put(
            "stepgate_authorized_total",
            "counter",
            "Messages let through by a token.",
            vec![(String::new(), by(Outcome::Authorized))],
        );
        put(
            "stepgate_token_rejections_total",
            "counter",
            "Tokens or uses refused, by reason code.",
            ReasonCode::ALL
                .iter()
                .map(|r| {
                    (
                        format!("{{reason=\"{r}\"}}"),
                        self.token_rejections[r.index()].load(Relaxed),
                    )
                })
                .collect(),
        );
        put(
            "stepgate_audit_write_failures_total",
            "counter",
            "Audit records that could not be written.",
            vec![(String::new(), self.audit_write_failures.load(Relaxed))],
        );
        put(
            "stepgate_upstream_connect_failures_total",
            "counter",
            "Failed connections to the upstream server.",
            vec![(String::new(), self.upstream_connect_failures.load(Relaxed))],
        );
        put(
            "stepgate_policy_reloads_total",
            "counter",
            "Reload attempts (applied or rejected).",
            vec![(String::new(), self.reloads.load(Relaxed))],
        );
        let _ = writeln!(
            s,
            "# HELP stepgate_classify_seconds Time to classify a message not already cached.\n# TYPE stepgate_classify_seconds histogram"
        );
        for (i, b) in BUCKETS_US.iter().enumerate() {
            let _ = writeln!(
                s,
                "stepgate_classify_seconds_bucket{{le=\"{}\"}} {}",
                *b as f64 / 1e6,
                self.classify_buckets[i].load(Relaxed)
            );
        }
        let count = self.classify_count.load(Relaxed);
        let _ = writeln!(s, "stepgate_classify_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            s,
            "stepgate_classify_seconds_sum {}",
            self.classify_sum_ns.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(s, "stepgate_classify_seconds_count {count}");
        if let Some((seq, hash)) = head {
            let _ = writeln!(
                s,
                "# HELP stepgate_audit_head The audit log's last record (record the hash elsewhere).\n# TYPE stepgate_audit_head gauge\nstepgate_audit_head{{hash=\"{hash}\"}} {seq}"
            );
        }
        s
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped. `head` reads the audit head.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    head: impl Fn() -> Option<(u64, String)> + Send + Sync + 'static,
) {
    let head = Arc::new(head);
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        let head = head.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if request.starts_with("GET ")
                && (path == "/metrics" || path.starts_with("/metrics?"))
            {
                ("200 OK", metrics.render(head()))
            } else {
                ("404 Not Found", "not found: try /metrics\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(response.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_order_matches_the_tables() {
        for (i, c) in Class::ALL.iter().enumerate() {
            assert_eq!(class_index(*c), i);
        }
        for (i, (o, _)) in OUTCOMES.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
        let m = Metrics::default();
        m.statement(Class::Ddl, Outcome::Observed);
        assert_eq!(m.statements(Class::Ddl, Outcome::Observed), 1);
        assert!(m
            .render(None)
            .contains("stepgate_statements_total{class=\"ddl\",decision=\"observed\"} 1"));
    }
}
