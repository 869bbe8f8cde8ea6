//! Per-statement costs of the classifier: a full parse (cold), a cached repeat, a new literal each call
//! (the shape cache), the frame scanner over a pgbench-like stream, and fingerprinting.
//! Run: `cargo bench --bench classify`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stepgate::classify::cache::CachedClassifier;
use stepgate::classify::{lex, split, Classifier, LexSettings};
use stepgate::wire::{FrameScanner, Step};

const PGBENCH: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;";
const JOIN_200: &str = "SELECT o.id, o.total, c.email, count(i.id) AS items FROM orders o JOIN customers c ON c.id = o.customer_id LEFT JOIN items i ON i.order_id = o.id WHERE o.created_at > now() - interval '7 days' GROUP BY o.id, c.email ORDER BY o.total DESC LIMIT 50";
const CREATE: &str = "CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers (id), total numeric(12,2) NOT NULL CHECK (total >= 0), created_at timestamptz NOT NULL DEFAULT now())";

fn insert_10k() -> String {
    let mut s = String::from("INSERT INTO events (id, kind, payload) VALUES ");
    let mut i = 0;
    while s.len() < 10_000 {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&format!("({i}, 'click', '{{\"x\": {i}}}')"));
        i += 1;
    }
    s
}

fn classify(c: &mut Criterion) {
    let insert = insert_10k();
    let cases: [(&str, &str); 4] = [
        ("pgbench_select", PGBENCH),
        ("join_200b", JOIN_200),
        ("create_table", CREATE),
        ("insert_10kb", &insert),
    ];
    let settings = LexSettings::default();
    let classifier = Classifier::default();
    let mut g = c.benchmark_group("classify");
    for (name, sql) in cases {
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("cold/{name}"), |b| {
            b.iter(|| classifier.analyze(black_box(sql), &settings).unwrap().len())
        });
        let cached = CachedClassifier::new(classifier.clone(), 10_000);
        cached.lookup(sql.as_bytes(), &settings, 1);
        g.bench_function(format!("cached/{name}"), |b| {
            b.iter(|| cached.lookup(black_box(sql.as_bytes()), &settings, 1).max)
        });
    }
    // pgbench -S in simple mode: the same statement with a new literal every call.
    let cached = CachedClassifier::new(classifier.clone(), 1 << 20);
    let mut n = 0u64;
    let texts: Vec<String> = (0..100_000)
        .map(|i| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i};"))
        .collect();
    g.bench_function("new_literal/pgbench_select", |b| {
        b.iter(|| {
            n = (n + 1) % texts.len() as u64;
            cached
                .lookup(texts[n as usize].as_bytes(), &settings, 1)
                .max
        })
    });
    g.bench_function("lex_only/pgbench_select", |b| {
        b.iter(|| lex::lex(black_box(PGBENCH), true).unwrap().len())
    });
    g.bench_function("fingerprint/join_200b", |b| {
        b.iter(|| {
            let t = lex::lex(black_box(JOIN_200), true).unwrap();
            split::fingerprint(&t)
        })
    });
    g.finish();
}

fn frames(c: &mut Criterion) {
    // 1000 Bind/Execute/Sync-sized messages, as a prepared-mode client sends them.
    let mut stream = Vec::new();
    for i in 0..1000u32 {
        for (tag, len) in [(b'B', 30u32), (b'E', 9), (b'S', 4)] {
            stream.push(tag);
            stream.extend_from_slice(&len.to_be_bytes());
            stream.extend(std::iter::repeat_n((i % 251) as u8, len as usize - 4));
        }
    }
    let mut g = c.benchmark_group("frames");
    g.throughput(Throughput::Elements(3000));
    g.bench_function("scan_3000_messages", |b| {
        b.iter(|| {
            let mut sc = FrameScanner::new(1 << 30);
            let mut pos = 0;
            loop {
                match sc.step(&stream[pos..], |t| t == b'Q' || t == b'P').unwrap() {
                    Step::NeedMore => break,
                    Step::Message { len, .. } => pos += len,
                    Step::Stream { now, .. } => pos += now,
                    Step::Pass(n) => pos += n,
                }
            }
            pos
        })
    });
    g.finish();
}

/// The whole per-round-trip work of the gate for pgbench's SELECT with a new literal each time: the Query
/// judged, then CommandComplete and ReadyForQuery seen — with the gate on and off.
fn session_round_trip(c: &mut Criterion) {
    use stepgate::config::{Config, Rule};
    use stepgate::gate::{Registry, SessionFields};
    use stepgate::proxy::gate::{GateContext, SessionState};
    use stepgate::wire::build;
    let complete = build::message(b'C', b"SELECT 1\0");
    let ready = build::message(b'Z', b"I");
    let mut g = c.benchmark_group("session round trip (new literal)");
    for (name, disabled) in [("gate on", false), ("gate off", true)] {
        let ctx = GateContext::new(Config::default(), Registry::new(None), disabled);
        let mut st = SessionState::new(SessionFields::default(), Rule::default(), Vec::new());
        let mut i = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                i += 1;
                let q = build::query(
                    format!(
                        "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
                        i % 1_000_000
                    )
                    .as_bytes(),
                );
                black_box(st.on_frontend(&ctx, b'Q', &q));
                black_box(st.on_backend(&ctx, b'C', &complete));
                black_box(st.on_backend(&ctx, b'Z', &ready));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, classify, frames, session_round_trip);
criterion_main!(benches);
