//! The pipe against a real PostgreSQL: every kind of client traffic passes through intact, and every
//! malformed input ends only its own session.

mod common;

use std::hash::Hasher;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::{self, Raw};
use common::*;
use futures_util::{SinkExt, StreamExt, TryStreamExt};

#[tokio::test]
async fn simple_and_extended_queries() {
    let g = gate().await;
    let c = g.client("postgres").await;
    let rows = c
        .simple_query("select 1 as a, 'two' as b; select 3")
        .await
        .unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "3"]);
    let row = c
        .query_one(
            "select $1::int + $2::int, $3::text || '!'",
            &[&40i32, &2i32, &"hi"],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hi!");
    // A server error passes through with its SQLSTATE, and the session goes on.
    let e = c
        .simple_query("select * from no_such_table")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42P01"));
    assert_eq!(
        c.query_one("select 7", &[]).await.unwrap().get::<_, i32>(0),
        7
    );
}

#[tokio::test]
async fn named_prepared_statements_and_sql_prepare() {
    let g = gate().await;
    let c = g.client("postgres").await;
    let st = c.prepare("select $1::int * 2").await.unwrap();
    for i in 0..20i32 {
        assert_eq!(
            c.query_one(&st, &[&i]).await.unwrap().get::<_, i32>(0),
            i * 2
        );
    }
    c.batch_execute("PREPARE triple(int) AS SELECT $1 * 3")
        .await
        .unwrap();
    let rows = c.simple_query("EXECUTE triple(5)").await.unwrap();
    let got = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(got.as_deref(), Some("15"));
}

#[tokio::test]
async fn pipelined_queries_come_back_in_order() {
    let g = gate().await;
    let c = g.client("postgres").await;
    let st = c
        .prepare("select $1::int, pg_sleep(0.001)::text")
        .await
        .unwrap();
    // tokio-postgres pipelines requests issued concurrently on one connection.
    let futs = (0..200i32).map(|i| {
        let c = &c;
        let st = &st;
        async move { c.query_one(st, &[&i]).await.unwrap().get::<_, i32>(0) }
    });
    let got = futures_util::future::join_all(futs).await;
    assert_eq!(got, (0..200).collect::<Vec<_>>());
}

#[tokio::test]
async fn transactions_commit_and_roll_back() {
    pg().create_db("pipe_tx").await;
    let direct = pg().direct_to("pipe_tx").await;
    direct
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let g = gate().await;
    let mut c = g.client("pipe_tx").await;
    let tx = c.transaction().await.unwrap();
    tx.execute("insert into t values (1)", &[]).await.unwrap();
    tx.rollback().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("insert into t values (2)", &[]).await.unwrap();
    tx.commit().await.unwrap();
    // An error inside a transaction aborts it; the server's 25P02 comes through.
    c.batch_execute("BEGIN").await.unwrap();
    let _ = c
        .batch_execute("insert into t values (2)")
        .await
        .unwrap_err();
    let e = c
        .batch_execute("insert into t values (3)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"));
    c.batch_execute("ROLLBACK").await.unwrap();
    let ids: Vec<i32> = direct
        .query("select id from t order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [2]);
}

#[tokio::test]
async fn copy_in_and_out_100mb_round_trip() {
    pg().create_db("pipe_copy").await;
    let direct = pg().direct_to("pipe_copy").await;
    direct
        .batch_execute("CREATE UNLOGGED TABLE blob (id int, payload text)")
        .await
        .unwrap();
    let g = gate().await;
    let c = g.client("pipe_copy").await;
    let payload = "x".repeat(1000);
    let rows = 100 * 1024; // ~100 MB
    let sink = c.copy_in("COPY blob FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut sent_hash = std::collections::hash_map::DefaultHasher::new();
    let mut sent = 0usize;
    let mut chunk = String::with_capacity(1 << 20);
    for i in 0..rows {
        let line = format!("{i}\t{payload}\n");
        sent_hash.write(line.as_bytes());
        sent += line.len();
        chunk.push_str(&line);
        if chunk.len() > (1 << 20) - 1100 || i == rows - 1 {
            sink.send(Bytes::from(std::mem::take(&mut chunk)))
                .await
                .unwrap();
        }
    }
    assert_eq!(sink.finish().await.unwrap(), rows as u64);
    assert!(sent > 100_000_000);
    let count: i64 = direct
        .query_one("select count(*) from blob", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, rows as i64);

    let stream = c
        .copy_out("COPY (SELECT * FROM blob ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut got_hash = std::collections::hash_map::DefaultHasher::new();
    let mut got = 0usize;
    while let Some(bytes) = stream.try_next().await.unwrap() {
        got_hash.write(&bytes);
        got += bytes.len();
    }
    assert_eq!(got, sent);
    assert_eq!(
        got_hash.finish(),
        sent_hash.finish(),
        "COPY OUT returned other bytes than COPY IN sent"
    );
}

#[tokio::test]
async fn listen_notify_through_the_proxy() {
    let g = gate().await;
    let (listener, mut conn) = g
        .config(&pg().user, "postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            let _ = tx.send(m);
        }
    });
    listener.batch_execute("LISTEN pipe_events").await.unwrap();
    let sender = g.client("postgres").await;
    sender
        .batch_execute("NOTIFY pipe_events, 'hello through stepgate'")
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notification within 5 s")
        .unwrap();
    match m {
        tokio_postgres::AsyncMessage::Notification(n) => {
            assert_eq!(n.channel(), "pipe_events");
            assert_eq!(n.payload(), "hello through stepgate");
        }
        other => panic!("expected a notification, got {other:?}"),
    }
}

#[tokio::test]
async fn cancel_reaches_the_running_query() {
    let g = gate().await;
    let c = g.client("postgres").await;
    let token = c.cancel_token();
    let started = Instant::now();
    let query = tokio::spawn(async move { c.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), query)
        .await
        .unwrap()
        .unwrap();
    let e = r.expect_err("the sleep was cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn cancel_with_unknown_key_is_ignored() {
    let g = gate().await;
    let c = g.client("postgres").await;
    let query = tokio::spawn(async move { c.simple_query("select pg_sleep(0.5)").await });
    let mut r = Raw::connect(g.addr).await;
    let mut pkt = 16u32.to_be_bytes().to_vec();
    pkt.extend(80877102u32.to_be_bytes());
    pkt.extend(1i32.to_be_bytes());
    pkt.extend(2i32.to_be_bytes());
    r.send(&pkt).await;
    assert!(r.until_closed().await.is_empty());
    assert!(
        query.await.unwrap().is_ok(),
        "an unknown key cancelled nothing"
    );
}

#[tokio::test]
async fn password_logins_pass_through() {
    let g = gate().await;
    for (user, pw) in [
        (SCRAM_USER, SCRAM_PASSWORD),
        (MD5_USER, MD5_PASSWORD),
        (CLEARTEXT_USER, CLEARTEXT_PASSWORD),
    ] {
        let mut cfg = g.config(user, "postgres");
        cfg.password(pw);
        let c = connect(cfg)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e:?}"));
        let who: String = c
            .query_one("select current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);
        let mut cfg = g.config(user, "postgres");
        cfg.password("wrong");
        let e = connect_err(cfg).await;
        assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{user}: {e}");
        let msg = e.as_db_error().unwrap().message();
        assert!(msg.contains("password authentication failed"), "{msg}");
    }
    g.assert_healthy().await;
}

#[tokio::test]
async fn notices_and_parameter_status_pass_through() {
    let direct = pg().direct().await;
    direct
        .batch_execute(
            "CREATE OR REPLACE FUNCTION pipe_notice() RETURNS int LANGUAGE plpgsql AS \
             $$ BEGIN RAISE NOTICE 'notice from the server'; RETURN 1; END $$",
        )
        .await
        .unwrap();
    let g = gate().await;
    let mut r = Raw::login(g.addr, &pg().user, "postgres", &[]).await;
    r.send(&raw::query(b"SET application_name = 'through-stepgate'"))
        .await;
    let msgs = r.until_ready().await;
    let status = msgs
        .iter()
        .find(|(t, _)| *t == b'S')
        .expect("ParameterStatus");
    assert_eq!(status.1, b"application_name\0through-stepgate\0");
    r.send(&raw::query(b"SELECT pipe_notice()")).await;
    let msgs = r.until_ready().await;
    let notice = msgs
        .iter()
        .find(|(t, _)| *t == b'N')
        .expect("NoticeResponse");
    assert_eq!(
        raw::field(&notice.1, b'M').as_deref(),
        Some("notice from the server")
    );
}

#[tokio::test]
async fn function_call_is_forwarded() {
    // FunctionCall is privileged for the gate; this test is about the pipe.
    let g = gate_with(pipe_only).await;
    let mut r = Raw::login(g.addr, &pg().user, "postgres", &[]).await;
    // FunctionCall int4pl (OID 177) with two binary int4 arguments.
    let mut body = 177u32.to_be_bytes().to_vec();
    body.extend(1u16.to_be_bytes());
    body.extend(1u16.to_be_bytes()); // binary
    body.extend(2u16.to_be_bytes());
    for v in [40i32, 2] {
        body.extend(4i32.to_be_bytes());
        body.extend(v.to_be_bytes());
    }
    body.extend(1u16.to_be_bytes()); // binary result
    r.send(&raw::msg(b'F', &body)).await;
    let msgs = r.until_ready().await;
    let v = msgs
        .iter()
        .find(|(t, _)| *t == b'V')
        .expect("FunctionCallResponse");
    assert_eq!(
        v.1,
        [&4i32.to_be_bytes()[..], &42i32.to_be_bytes()[..]].concat()
    );
}

#[tokio::test]
async fn latin1_bytes_pass_byte_for_byte() {
    let g = gate().await;
    let p = pg();
    let direct_addr: std::net::SocketAddr = format!("{}:{}", p.host, p.port).parse().unwrap();
    let sql = b"SELECT '\xe9t\xe9 \xe0 la plage' AS x, length('\xe9t\xe9')";
    let mut answers = Vec::new();
    for addr in [direct_addr, g.addr] {
        let mut r = Raw::login(addr, &p.user, "postgres", &[("client_encoding", b"LATIN1")]).await;
        r.send(&raw::query(sql)).await;
        answers.push(r.until_ready().await);
    }
    assert_eq!(answers[0], answers[1]);
    let row = answers[1].iter().find(|(t, _)| *t == b'D').unwrap();
    assert!(row.1.windows(3).any(|w| w == b"\xe9t\xe9"), "{:?}", row.1);
    assert!(row.1.ends_with(b"3"));
}

/// A stepgate setting in the startup packet other than `stepgate.token` is a typo or a probe: the session is
/// refused (42704, naming it) instead of starting without the token its user meant to give — and nothing of
/// it reaches the server, where it would exist as a placeholder any session could read. (The token itself is
/// taken at login: tests/token.rs.)
#[tokio::test]
async fn unknown_stepgate_startup_settings_are_refused() {
    let g = gate().await;
    let p = pg();
    let direct_addr: std::net::SocketAddr = format!("{}:{}", p.host, p.port).parse().unwrap();
    let probe = b"SHOW stepgate.note";
    let opts: &[u8] = b"-c stepgate.note=secret-value -c search_path=pipe_schema,public";
    // Sent straight to PostgreSQL, the setting would exist as a placeholder: the probe can tell.
    let mut d = Raw::login(direct_addr, &p.user, "postgres", &[("options", opts)]).await;
    d.send(&raw::query(probe)).await;
    let direct = d.until_ready().await;
    assert!(
        direct
            .iter()
            .any(|(t, b)| *t == b'D' && b.ends_with(b"secret-value")),
        "{direct:?}"
    );
    let cases: [(&str, &[u8], &str); 4] = [
        ("options", opts, "stepgate.note"),
        // PostgreSQL unescapes options: this is stepgate.x to the server.
        ("options", b"-c st\\epgate\\.x=1", "stepgate.x"),
        ("stepgate.Tokn", b"direct-param", "stepgate.tokn"),
        (
            "options",
            b"--stepgate.token=x -c stepgate.status=on",
            "stepgate.status",
        ),
    ];
    for (key, value, named) in cases {
        let mut r = Raw::connect(g.addr).await;
        r.send(&raw::startup_packet(&[
            ("user", p.user.as_bytes()),
            (key, value),
        ]))
        .await;
        let msgs = r.until_closed().await;
        assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42704"), "{msgs:?}");
        let message = Raw::error_message(&msgs).unwrap();
        assert!(
            message.contains(&format!("unrecognized stepgate setting \"{named}\"")),
            "{message}"
        );
    }
    g.assert_healthy().await;
}

#[tokio::test]
async fn odd_stepgate_option_is_refused() {
    let g = gate().await;
    let mut r = Raw::connect(g.addr).await;
    r.send(&raw::startup_packet(&[
        ("user", pg().user.as_bytes()),
        ("options", b"-c stepgate.token = spaced"),
    ]))
    .await;
    let msgs = r.until_closed().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42501"));
    g.assert_healthy().await;
}

// ---- malformed input: each ends only its own session -------------------------------------------

async fn expect_refused(g: &Gate, bytes: &[u8], code: &str) {
    let mut r = Raw::connect(g.addr).await;
    r.send(bytes).await;
    let msgs = r.until_closed().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some(code), "{msgs:?}");
    g.assert_healthy().await;
}

#[tokio::test]
async fn startup_length_below_minimum() {
    let g = gate().await;
    expect_refused(&g, &[0, 0, 0, 2, 1, 2, 3, 4], "08P01").await;
}

#[tokio::test]
async fn startup_length_above_limit_is_refused_without_reading_it() {
    let g = gate().await;
    // Declares 2 GiB; nothing else is sent, so an answer proves the length alone decided.
    expect_refused(&g, &[0x7f, 0xff, 0xff, 0xff], "08P01").await;
    expect_refused(&g, &65_537u32.to_be_bytes(), "08P01").await;
    // Past PostgreSQL's 10,000 bytes only stepgate's own settings may go: anything else is refused, saying so.
    let big = "x".repeat(12_000);
    let pkt = raw::startup_packet(&[
        ("user", b"u"),
        ("database", b"d"),
        ("application_name", big.as_bytes()),
    ]);
    let mut r = Raw::connect(g.addr).await;
    r.send(&pkt).await;
    let msgs = r.until_closed().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
    let text = Raw::error_message(&msgs).unwrap_or_default();
    assert!(text.contains("without stepgate's settings"), "{text}");
}

#[tokio::test]
async fn garbage_startup_packet() {
    let g = gate().await;
    let mut pkt = 16u32.to_be_bytes().to_vec();
    pkt.extend(b"GET / HTTP/1.1\r\n"[..12].iter());
    expect_refused(&g, &pkt, "0A000").await;
    let mut pkt = 12u32.to_be_bytes().to_vec();
    pkt.extend(196608u32.to_be_bytes());
    pkt.extend(b"user"); // no terminator
    expect_refused(&g, &pkt, "08P01").await;
}

#[tokio::test]
async fn message_length_below_four_after_login() {
    let g = gate().await;
    let mut r = Raw::login(g.addr, &pg().user, "postgres", &[]).await;
    r.send(&[b'Q', 0, 0, 0, 2]).await;
    let msgs = r.until_closed().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some("08P01"));
    assert!(Raw::error_message(&msgs)
        .unwrap()
        .contains("invalid message length"));
    g.assert_healthy().await;
}

#[tokio::test]
async fn message_above_max_message_size_is_refused_from_its_header() {
    let g = gate_with(|c| c.max_message_size = 64 * 1024).await;
    let mut r = Raw::login(g.addr, &pg().user, "postgres", &[]).await;
    // Header only: 1 GiB declared, no body sent.
    r.send(&[b'd', 0x40, 0, 0, 0]).await;
    let msgs = r.until_closed().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some("08P01"));
    assert!(
        Raw::error_message(&msgs)
            .unwrap()
            .contains("above the limit"),
        "{msgs:?}"
    );
    // A message just under the limit still passes.
    let mut r = Raw::login(g.addr, &pg().user, "postgres", &[]).await;
    let big = format!("select length('{}')", "y".repeat(60_000));
    r.send(&raw::query(big.as_bytes())).await;
    let msgs = r.until_ready().await;
    assert!(msgs
        .iter()
        .any(|(t, b)| *t == b'D' && b.ends_with(b"60000")));
    g.assert_healthy().await;
}

#[tokio::test]
async fn oversized_authentication_message_is_refused() {
    let g = gate().await;
    let mut r = Raw::connect(g.addr).await;
    r.send(&raw::startup_packet(&[
        ("user", SCRAM_USER.as_bytes()),
        ("database", b"postgres"),
    ]))
    .await;
    let (tag, _) = r.recv().await.expect("authentication request");
    assert_eq!(tag, b'R');
    // 100 000 bytes declared for a password message: above the 64 KiB limit before login.
    r.send(&[b'p', 0, 1, 0x86, 0xa0]).await;
    let msgs = r.until_closed().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
    g.assert_healthy().await;
}

#[tokio::test]
async fn silent_clients_time_out() {
    let g = gate_with(|c| c.startup_timeout = Duration::from_millis(300)).await;
    // Sends nothing at all: closed.
    let mut r = Raw::connect(g.addr).await;
    let started = Instant::now();
    assert!(r.until_closed().await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(3));
    // Sends its startup packet but never answers the password request: told why, then closed.
    let mut r = Raw::connect(g.addr).await;
    r.send(&raw::startup_packet(&[
        ("user", SCRAM_USER.as_bytes()),
        ("database", b"postgres"),
    ]))
    .await;
    let msgs = r.until_closed().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some("57014"), "{msgs:?}");
    g.assert_healthy().await;
}

#[tokio::test]
async fn upstream_unreachable_names_the_address() {
    let port = stepgate::devdb::free_port();
    let g = gate_with(|c| c.upstream = format!("127.0.0.1:{port}")).await;
    let e = connect_err(g.config("postgres", "postgres")).await;
    assert_eq!(sqlstate(&e).as_deref(), Some("08006"), "{e}");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
}

#[tokio::test]
async fn terminated_backend_reports_the_servers_error() {
    let g = gate().await;
    let c = g.client("postgres").await;
    let pid: i32 = c
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let direct = pg().direct().await;
    direct
        .execute("select pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let e = c.simple_query("select 1").await.unwrap_err();
    // Either the server's own FATAL 57P01 arrives, or the closed connection is reported.
    assert!(
        sqlstate(&e).as_deref() == Some("57P01") || e.is_closed(),
        "unexpected: {e}"
    );
    assert!(c.is_closed() || c.simple_query("select 1").await.is_err());
    g.assert_healthy().await;
}

#[tokio::test]
async fn a_client_that_sends_and_closes_ends_its_session_and_backend() {
    let g = gate().await;
    let app = "sends-then-closes";
    let mut r = Raw::login(
        g.addr,
        &pg().user,
        &pg().dbname,
        &[("application_name", app.as_bytes())],
    )
    .await;
    // A query and the end of the client's stream, back to back (usually one segment and one readiness
    // event): the relay must see the end, not stop at the query.
    use tokio::io::AsyncWriteExt;
    r.stream.write_all(&raw::query(b"select 1")).await.unwrap();
    r.stream.shutdown().await.unwrap();
    r.until_closed().await;
    let direct = pg().direct().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = direct
            .query_one(
                "select count(*) from pg_stat_activity where application_name = $1",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the upstream backend outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    g.assert_healthy().await;
}

/// The one case a real server cannot be made to produce without disturbing the other tests: the upstream
/// disappears without a word in the middle of a session. A scripted backend logs the client in, then
/// closes its socket when the first query arrives.
#[tokio::test]
async fn upstream_vanishing_mid_session_is_reported() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await.unwrap(); // startup packet
        let mut out = raw::msg(b'R', &0u32.to_be_bytes());
        out.extend(raw::msg(b'S', b"server_version\x0015.0\x00"));
        out.extend(raw::msg(b'S', b"client_encoding\x00UTF8\x00"));
        out.extend(raw::msg(b'K', &[0, 0, 0, 9, 0, 0, 0, 9]));
        out.extend(raw::msg(b'Z', b"I"));
        s.write_all(&out).await.unwrap();
        let _ = s.read(&mut buf).await; // the query
        drop(s);
    });
    let g = gate_with(|c| c.upstream = fake.to_string()).await;
    let mut r = Raw::login(g.addr, "postgres", "postgres", &[]).await;
    r.send(&raw::query(b"select 1")).await;
    let msgs = r.until_closed().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some("08006"), "{msgs:?}");
    assert!(Raw::error_message(&msgs)
        .unwrap()
        .contains("lost the connection"));
}

#[tokio::test]
async fn max_connections_refuses_with_53300() {
    let g = gate_with(|c| c.max_connections = 2).await;
    let a = g.client("postgres").await;
    let b = g.client("postgres").await;
    let e = connect_err(g.config(&pg().user, "postgres")).await;
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
    drop(b);
    // The permit returns once the session has ended.
    let mut ok = false;
    for _ in 0..50 {
        if connect(g.config(&pg().user, "postgres")).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a slot freed up after a session ended");
    assert_eq!(
        a.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn graceful_shutdown_lets_sessions_finish_then_closes_them() {
    let g = gate_with(|c| c.shutdown_timeout = Duration::from_millis(1500)).await;
    let busy = g.client("postgres").await;
    let idle = g.client("postgres").await;
    let running = tokio::spawn(async move {
        let r = busy.simple_query("select pg_sleep(0.5)").await;
        (r, busy)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    g.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No new sessions …
    assert!(connect(g.config(&pg().user, "postgres")).await.is_err());
    // … but the running statement completes.
    let (r, busy) = running.await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    // After shutdown_timeout, the remaining sessions are closed with 57P01.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let e = idle.simple_query("select 1").await.unwrap_err();
    assert!(
        sqlstate(&e).as_deref() == Some("57P01") || e.is_closed(),
        "{e}"
    );
    assert!(busy.is_closed() || busy.simple_query("select 1").await.is_err());
}

/// An upstream that is not PostgreSQL (an HTTP server on the configured port): its bytes never reach the
/// client, the client gets a FATAL that says so, on both relays. A scripted upstream: a real PostgreSQL
/// cannot answer this way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_not_postgresql_is_named_and_never_relayed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = http.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = http.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\nbad request")
                    .await;
            });
        }
    });
    for options in relays() {
        let up = upstream.clone();
        let g = gate_with_options(move |c| c.upstream = up, options).await;
        let mut raw = common::raw::Raw::connect(g.addr).await;
        raw.send(&common::raw::startup_packet(&[
            ("user", b"postgres"),
            ("database", b"postgres"),
        ]))
        .await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            raw.stream.read_to_end(&mut got),
        )
        .await;
        let text = String::from_utf8_lossy(&got);
        assert!(!text.contains("HTTP/1.1"), "{text}");
        assert_eq!(got.first(), Some(&b'E'), "{text}");
        assert!(
            text.contains("08006") && text.contains("did not answer as a PostgreSQL server"),
            "{text}"
        );
    }
}

/// At the shutdown timeout stepgate closes the sessions still open (57P01) and cancels what they were
/// running: a long INSERT does not commit after its client was told the session is over (issue 16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_closed_at_the_shutdown_timeout_does_not_commit_afterwards() {
    for (i, options) in relays().into_iter().enumerate() {
        let db = format!("prx_forced_close_{i}");
        pg().create_db(&db).await;
        let direct = pg().direct_to(&db).await;
        direct
            .batch_execute("CREATE TABLE t (a int)")
            .await
            .unwrap();
        let g =
            gate_with_options(|c| c.shutdown_timeout = Duration::from_millis(500), options).await;
        let c = g.client(&db).await;
        let long = tokio::spawn(async move {
            c.batch_execute("INSERT INTO t SELECT 1 FROM pg_sleep(4)")
                .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        g.shutdown();
        let err = long.await.unwrap().unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err:?}");
        // Past the moment the INSERT would have committed.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let n: i64 = direct
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "the statement ran on after the session was closed");
    }
}

/// A client that pipelines queries with large results without reading any, then disconnects: its session
/// ends and its backend goes away, on both relays (it used to stay, with its buffers, until SIGTERM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pipelines_without_reading_then_leaves_frees_its_backend() {
    for (i, options) in relays().into_iter().enumerate() {
        let g = gate_with_options(|_| {}, options).await;
        let app = format!("stuck_pipeline_{i}");
        let mut c = Raw::login(
            g.addr,
            &pg().user,
            "postgres",
            &[("application_name", app.as_bytes())],
        )
        .await;
        // More queries than the legs' buffers hold, each with a large result: the server blocks writing
        // results nobody reads, stops reading queries, and stepgate is left holding queries for it.
        let one = raw::query(b"SELECT repeat('x', 100000)");
        let mut burst = Vec::new();
        for _ in 0..400_000 {
            burst.extend_from_slice(&one);
        }
        // Nothing is read back; the kernel buffers fill on every leg.
        let _ = tokio::time::timeout(Duration::from_secs(3), c.send(&burst)).await;
        drop(c);
        let direct = pg().direct().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n: i64 = direct
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                    &[&app],
                )
                .await
                .unwrap()
                .get(0);
            if n == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the backend of a client that left is still there after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
