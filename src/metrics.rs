//! Prometheus metrics (`metrics_listen`, `GET /metrics`): sessions, statements by class and decision, held,
//! authorized, token rejections by reason, audit write failures, upstream connect failures, a classification
//! time histogram, and the audit head. Counters are relaxed atomics; rendering reads them without locking.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

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

    /// The Prometheus text exposition (format 0.0.4, encoded by `prometheus-client`) of the counters now;
    /// `head` is the audit log's (seq, hash). The counters stay plain atomics on the hot path; a scrape
    /// copies them into a registry of constant metrics.
    pub fn render(&self, head: Option<(u64, String)>) -> String {
        self.render_with(head, false)
    }

    /// [`Metrics::render`], saying whether the audit log can be written now (its last append succeeded).
    pub fn render_with(&self, head: Option<(u64, String)>, audit_unavailable: bool) -> String {
        let mut r = Registry::default();
        let labelled = |pairs: Vec<(Vec<(String, String)>, u64)>| {
            let family = Family::<Vec<(String, String)>, Counter>::default();
            for (labels, v) in pairs {
                family.get_or_create(&labels).inc_by(v);
            }
            family
        };
        let gauge = |v: i64| {
            let g: Gauge = Gauge::default();
            g.set(v);
            g
        };
        r.register(
            "stepgate_sessions_open",
            "Client sessions open now",
            gauge(self.sessions_open.load(Relaxed).max(0)),
        );
        r.register(
            "stepgate_sessions",
            "Client sessions accepted",
            ConstCounter::new(self.sessions_total.load(Relaxed)),
        );
        let mut lines = Vec::new();
        for (ci, c) in Class::ALL.iter().enumerate() {
            for (oi, (_, o)) in OUTCOMES.iter().enumerate() {
                lines.push((
                    vec![
                        ("class".to_string(), c.as_str().to_string()),
                        ("decision".to_string(), o.to_string()),
                    ],
                    self.statements[ci][oi].load(Relaxed),
                ));
            }
        }
        r.register(
            "stepgate_statements",
            "Messages judged, by their most dangerous class and the decision",
            labelled(lines),
        );
        let by = |o: Outcome| -> u64 { Class::ALL.iter().map(|c| self.statements(*c, o)).sum() };
        r.register(
            "stepgate_held",
            "Messages held (refused without a covering token)",
            ConstCounter::new(by(Outcome::Held)),
        );
        r.register(
            "stepgate_authorized",
            "Messages let through by a token",
            ConstCounter::new(by(Outcome::Authorized)),
        );
        r.register(
            "stepgate_token_rejections",
            "Tokens or uses refused, by reason code",
            labelled(
                ReasonCode::ALL
                    .iter()
                    .map(|c| {
                        (
                            vec![("reason".to_string(), c.as_str().to_string())],
                            self.token_rejections[c.index()].load(Relaxed),
                        )
                    })
                    .collect(),
            ),
        );
        r.register(
            "stepgate_audit_write_failures",
            "Audit records that could not be written",
            ConstCounter::new(self.audit_write_failures.load(Relaxed)),
        );
        r.register(
            "stepgate_upstream_connect_failures",
            "Failed connections to the upstream server",
            ConstCounter::new(self.upstream_connect_failures.load(Relaxed)),
        );
        r.register(
            "stepgate_policy_reloads",
            "Reload attempts (applied or rejected)",
            ConstCounter::new(self.reloads.load(Relaxed)),
        );
        // The atomics count cumulatively (a fast classification is in every bucket above it).
        let mut below = 0;
        let buckets = BUCKETS_US
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let cumulative = self.classify_buckets[i].load(Relaxed);
                let here = cumulative.saturating_sub(below);
                below = cumulative;
                (*b as f64 / 1e6, here)
            })
            .collect();
        r.register(
            "stepgate_classify_seconds",
            "Time to classify a message not already cached",
            ConstHistogram {
                sum: self.classify_sum_ns.load(Relaxed) as f64 / 1e9,
                count: self.classify_count.load(Relaxed),
                buckets,
            },
        );
        r.register(
            "stepgate_audit_unavailable",
            "1 while the audit log cannot be written (its last append failed): guarded statements are refused",
            gauge(i64::from(audit_unavailable)),
        );
        if let Some((seq, hash)) = head {
            let family = Family::<Vec<(String, String)>, Gauge>::default();
            family
                .get_or_create(&vec![("hash".to_string(), hash)])
                .set(seq as i64);
            r.register(
                "stepgate_audit_head",
                "The audit log's last record (record the hash elsewhere)",
                family,
            );
        }
        let mut out = String::with_capacity(4096);
        // Writing into a String does not fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &r);
        out
    }
}

/// A histogram whose buckets were counted elsewhere (per-bucket counts, not cumulative).
#[derive(Debug)]
struct ConstHistogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Scrapes answered at once; more connections wait to be accepted.
const MAX_SCRAPES: usize = 4;

/// Serves `GET /metrics` on `listener` until the task is dropped (its scrapes with it). `audit` reads the
/// audit head and whether the log can be written now. At most [`MAX_SCRAPES`] are answered at a time, each within 5 s.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    audit: impl Fn() -> (Option<(u64, String)>, bool) + Send + Sync + 'static,
) {
    let audit = Arc::new(audit);
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    let mut scrapes = tokio::task::JoinSet::new();
    loop {
        while scrapes.try_join_next().is_some() {}
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        let audit = audit.clone();
        scrapes.spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = if request.starts_with("GET ")
                    && (path == "/metrics" || path.starts_with("/metrics?"))
                {
                    let (head, unavailable) = audit();
                    ("200 OK", metrics.render_with(head, unavailable))
                } else {
                    ("404 Not Found", "not found: try /metrics\n".to_string())
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
                let _ = sock.shutdown().await;
            })
            .await;
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
        m.classified(Duration::from_micros(7));
        let text = m.render(Some((42, "sha256:ab".into())));
        assert!(text.contains("stepgate_statements_total{class=\"ddl\",decision=\"observed\"} 1"));
        assert!(
            text.contains("# TYPE stepgate_classify_seconds histogram"),
            "{text}"
        );
        // Cumulative buckets: 7 µs is in the 10 µs bucket and every one above it, not in the 5 µs one.
        assert!(
            text.contains("stepgate_classify_seconds_bucket{le=\"5e-06\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("stepgate_classify_seconds_bucket{le=\"1e-05\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("stepgate_classify_seconds_bucket{le=\"+Inf\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("stepgate_audit_head{hash=\"sha256:ab\"} 42"),
            "{text}"
        );
    }
}
