//! Session integrity (issue 15): stepgate's reading of a session is the server's. Each test is an attack
//! whose success is checked on the server itself, through both relays (epoll, and `--workers 0`).

mod common;

use common::raw::{msg, query, Raw};
use common::tokens::*;
use common::*;
use stepgate::config::Rule;

/// A raw connection that has sent its startup packet with these parameters.
async fn started(addr: std::net::SocketAddr, params: &[(&str, &[u8])]) -> Raw {
    let mut raw = Raw::connect(addr).await;
    raw.send(&common::raw::startup_packet(params)).await;
    raw
}

/// Sends one Query on a logged-in raw connection and asserts stepgate held it (42501); returns the replies.
async fn held_query(raw: &mut Raw, sql: &[u8]) -> Vec<(u8, Vec<u8>)> {
    raw.send(&query(sql)).await;
    let msgs = raw.until_ready().await;
    assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42501"), "{msgs:?}");
    msgs
}

/// A query pipelined behind the startup packet (trust login) never reaches the server: the session is
/// refused with FATAL 08P01 and the table is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_pipelined_behind_the_startup_packet_is_refused() {
    let direct = setup("si_prelogin").await;
    for options in relays() {
        let g = gate_with_options(|_| {}, options).await;
        let mut raw = Raw::connect(g.addr).await;
        let mut bytes = common::raw::startup_packet(&[
            ("user", pg().user.as_bytes()),
            ("database", b"si_prelogin"),
        ]);
        bytes.extend(query(b"DROP TABLE t"));
        raw.send(&bytes).await;
        let msgs = raw.until_closed().await;
        assert_eq!(Raw::error_code(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
        assert!(
            Raw::error_message(&msgs)
                .unwrap()
                .contains("before the login completed"),
            "{msgs:?}"
        );
        assert!(exists(&direct, "t").await, "the pipelined DROP ran");
        g.assert_healthy().await;
    }
}

/// The same behind a cleartext password: the password and the DROP arrive in one write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_pipelined_behind_the_password_is_refused() {
    if pg().devdb().is_none() {
        return; // DATABASE_URL: the password roles are the throwaway server's
    }
    let direct = setup("si_prelogin_pw").await;
    direct
        .batch_execute(&format!(
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO {CLEARTEXT_USER}; ALTER TABLE t OWNER TO {CLEARTEXT_USER}"
        ))
        .await
        .unwrap();
    for options in relays() {
        let g = gate_with_options(|_| {}, options).await;
        let mut raw = started(
            g.addr,
            &[
                ("user", CLEARTEXT_USER.as_bytes()),
                ("database", b"si_prelogin_pw"),
            ],
        )
        .await;
        let (tag, body) = raw.recv().await.unwrap();
        assert_eq!((tag, &body[..4]), (b'R', &3u32.to_be_bytes()[..]));
        let mut pw = CLEARTEXT_PASSWORD.as_bytes().to_vec();
        pw.push(0);
        let mut bytes = msg(b'p', &pw);
        bytes.extend(query(b"DROP TABLE t"));
        raw.send(&bytes).await;
        let msgs = raw.until_closed().await;
        assert_eq!(Raw::error_code(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
        assert!(exists(&direct, "t").await, "the pipelined DROP ran");
    }
}

/// `user=dba, database=stepgate, user=app`: PostgreSQL logs in `app`, and so does stepgate's reading, so
/// the console sees `app` (not an admin) and refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_user_cannot_open_the_console_as_another_user() {
    for options in relays() {
        let g = gate_with_options(
            |c| {
                c.admin = Some(stepgate::config::AdminConfig {
                    users: vec!["dba".into()],
                    listen: None,
                    auth_database: "postgres".into(),
                })
            },
            options,
        )
        .await;
        let mut raw = started(
            g.addr,
            &[
                ("user", b"dba"),
                ("database", b"stepgate"),
                ("user", pg().user.as_bytes()),
            ],
        )
        .await;
        let msgs = raw.until_closed().await;
        assert_eq!(Raw::error_code(&msgs).as_deref(), Some("28000"), "{msgs:?}");
        let m = Raw::error_message(&msgs).unwrap();
        assert!(m.contains(&format!("\"{}\"", pg().user)), "{m}");
        assert!(!msgs.iter().any(|(t, _)| *t == b'Z'), "{msgs:?}");
        assert!(
            !g.audit()
                .iter()
                .any(|r| r["user"] == "dba" && r["outcome"] == "ok"),
            "the audit log names dba"
        );
    }
}

/// A lax rule for one user name cannot be picked by naming that user first and logging in as another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_user_cannot_pick_a_laxer_rule() {
    let direct = setup("si_rule").await;
    for options in relays() {
        let g = gate_with_options(
            |c| {
                c.rules = vec![
                    Rule {
                        user: "lax".into(),
                        guard: vec![],
                        ..Default::default()
                    },
                    Rule::default(),
                ]
            },
            options,
        )
        .await;
        let mut raw = started(
            g.addr,
            &[
                ("user", b"lax"),
                ("database", b"si_rule"),
                ("user", pg().user.as_bytes()),
            ],
        )
        .await;
        raw.until_ready().await;
        held_query(&mut raw, b"DROP TABLE t").await;
        assert!(
            exists(&direct, "t").await,
            "the DROP ran under the lax rule"
        );
    }
}

/// Without a `database` parameter PostgreSQL opens the database named like the user; a rule for that
/// database applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_defaults_to_the_user_name_for_rules() {
    let user = "si_defdb";
    let _ = pg()
        .direct()
        .await
        .batch_execute(&format!("CREATE ROLE {user} LOGIN"))
        .await;
    let direct = setup(user).await;
    // The role could drop the table itself: only stepgate stands in the way.
    direct
        .batch_execute(&format!("ALTER TABLE t3 OWNER TO {user}"))
        .await
        .unwrap();
    let g = gate_with(|c| {
        c.rules = vec![
            Rule {
                database: user.into(),
                ..Default::default()
            },
            Rule {
                guard: vec![],
                ..Default::default()
            },
        ]
    })
    .await;
    let mut raw = started(g.addr, &[("user", user.as_bytes())]).await;
    let login = raw.until_ready().await;
    assert!(login.iter().any(|(t, _)| *t == b'Z'), "{login:?}");
    held_query(&mut raw, b"DROP TABLE t3").await;
    assert!(exists(&direct, "t3").await, "the DROP ran");
}

/// A token for user `migrator` is checked against the user the server logged in, not the first `user`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_user_cannot_satisfy_a_tokens_user_line() {
    let direct = setup("si_tokuser").await;
    for options in relays() {
        let g = gate_with_options(policy, options).await;
        let mut p = payload("si_tokuser", &["DROP TABLE t"]);
        p.user = Some("migrator".into());
        let token = sign(&p, &["alice"]);
        let mut raw = started(
            g.addr,
            &[
                ("user", b"migrator"),
                ("database", b"si_tokuser"),
                ("user", pg().user.as_bytes()),
            ],
        )
        .await;
        raw.until_ready().await;
        raw.send(&query(set_token(&token).as_bytes())).await;
        let msgs = raw.until_ready().await;
        assert_eq!(Raw::error_code(&msgs).as_deref(), Some("28000"), "{msgs:?}");
        assert!(
            Raw::error_message(&msgs).unwrap().contains("wrong_user"),
            "{msgs:?}"
        );
        held_query(&mut raw, b"DROP TABLE t").await;
        assert!(exists(&direct, "t").await);
    }
}

/// A change of standard_conforming_strings or client_encoding in flight: the SET and a statement whose
/// reading depends on it arrive in one write, before stepgate hears the server confirm the SET. The
/// statement is read every way the server might read it, and held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_changed_in_flight_cannot_hide_a_drop() {
    let direct = setup("si_inflight").await;
    for options in relays() {
        let g = gate_with_options(|_| {}, options).await;
        for (set, attack) in [
            (
                &b"SET standard_conforming_strings = off"[..],
                // On: two literals. Off: one literal "a', " and then the DROP.
                &b"SELECT 'a\\', '; DROP TABLE t; -- '"[..],
            ),
            (
                &b"SET client_encoding = 'GBK'"[..],
                // UTF-8 reads E'\xe4\xb8\xad\' … as one literal; GBK reads \xad\x5c as one character,
                // ends the literal at the next quote and runs the DROP.
                &b"SELECT E'\xe4\xb8\xad\\'; DROP TABLE t; --'"[..],
            ),
        ] {
            let mut raw = Raw::login(g.addr, &pg().user, "si_inflight", &[]).await;
            let mut bytes = query(set);
            bytes.extend(query(attack));
            raw.send(&bytes).await;
            let first = raw.until_ready().await;
            assert_eq!(Raw::error_code(&first), None, "{first:?}");
            let second = raw.until_ready().await;
            assert_eq!(
                Raw::error_code(&second).as_deref(),
                Some("42501"),
                "{second:?}"
            );
            assert!(exists(&direct, "t").await, "the DROP ran");
        }
    }
}

/// SQL FETCH/MOVE on a portal bound by the protocol runs that portal's statement: judged by it, as a
/// protocol Execute is — whether the FETCH comes as a Query, or as a prepared statement parsed before the
/// portal was bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_and_move_are_judged_by_their_portal() {
    use stepgate::wire::build::{bind, execute, parse, sync};
    let direct = setup("si_fetch").await;
    for options in relays() {
        let g = gate_with_options(|_| {}, options).await;
        for fetch in [
            &b"FETCH ALL FROM cur"[..],
            b"MOVE ALL IN cur",
            b"FETCH 1 cur",
        ] {
            // As a Query, after the portal is bound.
            let mut raw = Raw::login(g.addr, &pg().user, "si_fetch", &[]).await;
            raw.send(&query(b"BEGIN")).await;
            raw.until_ready().await;
            let mut b = parse(b"s", b"DELETE FROM t RETURNING id");
            b.extend(bind(b"cur", b"s"));
            b.extend(sync());
            raw.send(&b).await;
            let bound = raw.until_ready().await;
            assert_eq!(Raw::error_code(&bound), None, "{bound:?}");
            raw.send(&query(fetch)).await;
            let msgs = raw.until_ready().await;
            assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42501"), "{msgs:?}");
            assert_eq!(count(&direct, "t").await, 3, "the FETCH ran the DELETE");

            // Prepared before the portal exists, executed after it is bound.
            let mut raw = Raw::login(g.addr, &pg().user, "si_fetch", &[]).await;
            raw.send(&query(b"BEGIN")).await;
            raw.until_ready().await;
            let mut b = parse(b"f", fetch);
            b.extend(parse(b"s", b"DELETE FROM t RETURNING id"));
            b.extend(bind(b"cur", b"s"));
            b.extend(bind(b"", b"f"));
            b.extend(execute(b""));
            b.extend(sync());
            raw.send(&b).await;
            let msgs = raw.until_ready().await;
            assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42501"), "{msgs:?}");
            assert_eq!(
                count(&direct, "t").await,
                3,
                "the prepared FETCH ran the DELETE"
            );
        }
        // A cursor DECLAREd in SQL is judged when declared; fetching from it passes.
        let c = g.client("si_fetch").await;
        c.batch_execute("BEGIN; DECLARE c CURSOR FOR SELECT id FROM t; FETCH ALL FROM c; COMMIT")
            .await
            .unwrap();
    }
}

/// PostgreSQL keeps the first 63 bytes of a statement or portal name: a longer name overwrites the shorter
/// one it shares them with, by SQL and by protocol, and stepgate must see the same overwrite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_are_truncated_as_postgresql_truncates_them() {
    use stepgate::wire::build::{bind, execute, parse, sync};
    let direct = setup("si_names").await;
    let short = "x".repeat(63);
    let long = format!("{short}zzz");
    for options in relays() {
        let g = gate_with_options(|_| {}, options).await;
        // SQL: PREPARE the harmless name, then re-PREPARE through the long name (after DEALLOCATE of the
        // short one, as the server sees the same name), then EXECUTE the short one.
        let c = g.client("si_names").await;
        c.batch_execute(&format!("PREPARE {short} AS SELECT 1"))
            .await
            .unwrap();
        let e = c
            .batch_execute(&format!(
                "DEALLOCATE {long}; PREPARE {long} AS DELETE FROM t; EXECUTE {short}"
            ))
            .await
            .unwrap_err();
        assert_eq!(e.as_db_error().unwrap().code().code(), "42501", "{e:?}");
        assert_eq!(count(&direct, "t").await, 3, "the DELETE ran by SQL");

        // Protocol: statement and portal names.
        let mut raw = Raw::login(g.addr, &pg().user, "si_names", &[]).await;
        let mut b = parse(short.as_bytes(), b"SELECT 1");
        b.extend(sync());
        raw.send(&b).await;
        raw.until_ready().await;
        let mut b = parse(b"", b"SELECT 1");
        b.extend(stepgate::wire::build::message(
            b'C',
            &[b"S".as_slice(), long.as_bytes(), b"\0"].concat(),
        ));
        b.extend(parse(long.as_bytes(), b"DELETE FROM t"));
        b.extend(bind(b"", short.as_bytes()));
        b.extend(execute(b""));
        b.extend(sync());
        raw.send(&b).await;
        let msgs = raw.until_ready().await;
        assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42501"), "{msgs:?}");
        assert_eq!(count(&direct, "t").await, 3, "the DELETE ran by protocol");

        let mut raw = Raw::login(g.addr, &pg().user, "si_names", &[]).await;
        raw.send(&query(b"BEGIN")).await;
        raw.until_ready().await;
        let mut b = parse(b"s", b"SELECT 1");
        b.extend(parse(b"d", b"DELETE FROM t"));
        b.extend(bind(short.as_bytes(), b"s"));
        b.extend(stepgate::wire::build::message(
            b'C',
            &[b"P".as_slice(), long.as_bytes(), b"\0"].concat(),
        ));
        b.extend(bind(long.as_bytes(), b"d"));
        b.extend(execute(short.as_bytes()));
        b.extend(sync());
        raw.send(&b).await;
        let msgs = raw.until_ready().await;
        assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42501"), "{msgs:?}");
        assert_eq!(
            count(&direct, "t").await,
            3,
            "the DELETE ran through a portal"
        );
    }
}

/// What stepgate sends in place of a refused statement runs nothing a client can name: another session that
/// reads it in pg_stat_activity and plants a DELETE under every name it shows (and under the names of the
/// refusal messages themselves) gets its own next refusal without the DELETE running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_cannot_be_planted_or_read() {
    use stepgate::wire::build::{bind, execute, parse, sync};
    let direct = setup("si_plant").await;
    for options in relays() {
        let g = gate_with_options(|_| {}, options).await;
        let a = g.client("si_plant").await;
        a.batch_execute("DROP TABLE t").await.unwrap_err();
        let shown: Vec<String> = direct
            .query(
                "SELECT query FROM pg_stat_activity WHERE datname = 'si_plant' AND query NOT LIKE '%pg_stat_activity%'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        assert!(
            shown.iter().all(|q| !q.contains("DROP")),
            "the refused text reached the server: {shown:?}"
        );
        let mut names: Vec<String> = shown
            .iter()
            .flat_map(|q| {
                q.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                    .filter(|w| !w.is_empty() && !w.chars().next().unwrap().is_ascii_digit())
                    .map(str::to_lowercase)
                    .collect::<Vec<_>>()
            })
            .collect();
        names.extend(["stepgate_refusal".to_string(), "stepgate".to_string()]);
        names.sort();
        names.dedup();
        let mut raw = Raw::login(g.addr, &pg().user, "si_plant", &[]).await;
        raw.send(&query(b"BEGIN")).await;
        raw.until_ready().await;
        let mut b = Vec::new();
        for n in &names {
            b.extend(parse(n.as_bytes(), b"DELETE FROM t"));
            b.extend(bind(n.as_bytes(), n.as_bytes()));
        }
        b.extend(sync());
        raw.send(&b).await;
        let planted = raw.until_ready().await;
        assert_eq!(Raw::error_code(&planted), None, "{planted:?}");
        // A refused Query, and refused Executes.
        raw.send(&query(b"DROP TABLE t3")).await;
        let msgs = raw.until_ready().await;
        assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42501"), "{msgs:?}");
        raw.send(&query(b"ROLLBACK")).await;
        raw.until_ready().await;
        let mut b = parse(b"x", b"DROP TABLE t3");
        b.extend(bind(b"", b"x"));
        b.extend(execute(b""));
        b.extend(sync());
        raw.send(&b).await;
        let msgs = raw.until_ready().await;
        assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42501"), "{msgs:?}");
        let mut b = parse(b"", b"DELETE FROM t");
        b.extend(bind(b"", b""));
        b.extend(execute(b""));
        b.extend(sync());
        raw.send(&b).await;
        let msgs = raw.until_ready().await;
        assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42501"), "{msgs:?}");
        assert_eq!(count(&direct, "t").await, 3, "a planted DELETE ran");
        assert!(exists(&direct, "t3").await);
    }
}

/// A use comes back only where PostgreSQL provably undid the statement: a privileged statement that fails
/// after it began (a statement timeout after nextval and pg_reload_conf; a COPY … TO PROGRAM whose program
/// fails after it ran) keeps its use spent, so it runs at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_privileged_statement_runs_at_most_once() {
    let direct = setup("si_once").await;
    direct.batch_execute("CREATE SEQUENCE c").await.unwrap();
    for (round, options) in relays().into_iter().enumerate() {
        let g = gate_with_options(policy, options).await;
        let proof = format!("/tmp/stepgate-once-{}", std::process::id());
        let _ = std::fs::remove_file(&proof);
        let copy = format!("COPY (SELECT 1) TO PROGRAM 'echo ran >> {proof}; exit 1'");
        let timed = "SELECT nextval('c'), pg_reload_conf(), pg_sleep(1)";
        let token = sign(&payload("si_once", &[timed, &copy]), &["alice"]);
        let c = g.client("si_once").await;
        c.batch_execute(&set_token(&token)).await.unwrap();
        c.batch_execute("SET statement_timeout = '300ms'")
            .await
            .unwrap();
        let spent = |e: &tokio_postgres::Error| {
            let db = e.as_db_error().unwrap();
            db.code().code() == "42501" && db.detail().unwrap_or("").contains("already_used")
        };
        for attempt in 0..3 {
            let e = c.batch_execute(timed).await.unwrap_err();
            if attempt == 0 {
                assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e:?}");
            } else {
                assert!(spent(&e), "attempt {attempt}: {e:?}");
            }
            let e = c.batch_execute(&copy).await.unwrap_err();
            if attempt == 0 {
                assert!(
                    !spent(&e) && sqlstate(&e).as_deref() != Some("42501"),
                    "{e:?}"
                );
            } else {
                assert!(spent(&e), "attempt {attempt}: {e:?}");
            }
        }
        let last: i64 = direct
            .query_one("SELECT last_value FROM c", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(last, round as i64 + 1, "nextval ran more than once");
        let ran = std::fs::read_to_string(&proof).unwrap_or_default();
        assert_eq!(
            ran.lines().count(),
            1,
            "the program ran {} times",
            ran.lines().count()
        );
        let _ = std::fs::remove_file(&proof);
    }
}

/// CopyDone and CopyFail outside COPY are ignored by the server, which still answers the Syncs around them:
/// stepgate's expected replies stay in step, and a later DELETE is judged. Inside a COPY the Syncs the
/// client pipelined are ignored by the server, and stepgate expects no answer for them either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_messages_outside_copy_keep_the_session_in_step() {
    use stepgate::wire::build::{bind, execute, message, parse, sync};
    let direct = setup("si_copy").await;
    for options in relays() {
        let g = gate_with_options(|_| {}, options).await;
        let mut raw = Raw::login(g.addr, &pg().user, "si_copy", &[]).await;
        for end in [b'c', b'f'] {
            let body: &[u8] = if end == b'f' { b"no\0" } else { b"" };
            let mut b = sync();
            b.extend(sync());
            b.extend(message(end, body));
            b.extend(sync());
            raw.send(&b).await;
            for _ in 0..3 {
                let msgs = raw.until_ready().await;
                assert_eq!(Raw::error_code(&msgs), None, "{msgs:?}");
            }
            held_query(&mut raw, b"DELETE FROM t").await;
            let mut b = parse(b"", b"DELETE FROM t");
            b.extend(bind(b"", b""));
            b.extend(execute(b""));
            b.extend(sync());
            raw.send(&b).await;
            let msgs = raw.until_ready().await;
            assert_eq!(Raw::error_code(&msgs).as_deref(), Some("42501"), "{msgs:?}");
            assert_eq!(count(&direct, "t").await, 3, "the DELETE ran");
        }
        // A real COPY through the extended protocol, Syncs pipelined inside it, then a judged DELETE.
        let mut b = parse(b"", b"COPY t2 FROM STDIN");
        b.extend(bind(b"", b""));
        b.extend(execute(b""));
        b.extend(sync());
        b.extend(message(b'd', b"7\n"));
        b.extend(sync());
        b.extend(message(b'c', b""));
        b.extend(sync());
        raw.send(&b).await;
        let msgs = raw.until_ready().await;
        assert_eq!(Raw::error_code(&msgs), None, "{msgs:?}");
        held_query(&mut raw, b"DELETE FROM t").await;
        raw.send(&query(b"SELECT 1")).await;
        let msgs = raw.until_ready().await;
        assert_eq!(Raw::error_code(&msgs), None, "{msgs:?}");
        assert_eq!(count(&direct, "t").await, 3);
    }
}

/// The per-message model against a real server: random sequences of every frontend message type (Parse,
/// Bind, Execute, Describe, Close of known and unknown names, Sync, Flush, Query, FunctionCall, CopyData,
/// CopyDone and CopyFail outside COPY, transaction control, cursors, errors) go to PostgreSQL while the
/// session model is fed the same messages and every reply. Nothing is guarded, so the model must never
/// rewrite a reply, and once the server has answered a round it must expect no further reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reply_model_matches_a_real_server_message_for_message() {
    use rand::{Rng, SeedableRng};
    use stepgate::proxy::gate::{Action, GateContext, SessionState};
    use stepgate::wire::build::{bind, execute, message, parse, sync};
    let _ = setup("si_model").await;
    let mut config = stepgate::config::Config::default();
    pipe_only(&mut config);
    let ctx = GateContext::new(config.clone(), stepgate::gate::Registry::new(None), false);
    let mut state = SessionState::new(
        Default::default(),
        config.rule_for("si_model", &pg().user),
        Vec::new(),
    );
    let addr: std::net::SocketAddr = pg().addr().parse().unwrap();
    let mut raw = Raw::login(addr, &pg().user, "si_model", &[]).await;
    let seed: u64 = std::env::var("MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261202);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let names = ["", "a", "b", &"n".repeat(70)];
    let sqls = [
        "SELECT 1",
        "SELECT $1::int",
        "SELECT * FROM t",
        "SELEC 1",
        "SELECT 1/0",
        "BEGIN",
        "COMMIT",
        // (Savepoint commands are left out: EXECUTE of a prepared ROLLBACK TO SAVEPOINT makes PostgreSQL 15
        // end the connection with an internal error.)
        "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t",
        "FETCH 1 FROM c",
        "CLOSE c",
        "SET application_name = 'x'",
        "COPY (SELECT 1) TO STDOUT",
        "INSERT INTO t2 VALUES (1)",
        "",
    ];
    let queries = [
        "SELECT 1",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SELECT 1; SELECT 2",
        "SELEC 1",
        "SELECT 1/0",
        "PREPARE a AS SELECT 1",
        "DEALLOCATE a",
        "DEALLOCATE ALL",
        "EXECUTE a",
        "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t",
        "FETCH ALL FROM c",
        "CLOSE c",
        "DISCARD ALL",
        "",
        ";",
    ];
    let mut sent = 0usize;
    let mut mismatches = 0usize;
    let mut round = 0u64;
    while sent < 100_000 {
        round += 1;
        let mut batch = Vec::new();
        for _ in 0..rng.random_range(1..25) {
            let pick = |rng: &mut rand::rngs::StdRng, from: &[&str]| {
                from[rng.random_range(0..from.len())].to_string()
            };
            let m = match rng.random_range(0..14) {
                0 | 1 => parse(
                    pick(&mut rng, &names).as_bytes(),
                    pick(&mut rng, &sqls).as_bytes(),
                ),
                2 | 3 => {
                    let mut b = bind(
                        pick(&mut rng, &names).as_bytes(),
                        pick(&mut rng, &names).as_bytes(),
                    );
                    if rng.random_bool(0.3) {
                        // One text parameter, for SELECT $1::int.
                        let len = b.len();
                        b.truncate(len - 4);
                        b.extend_from_slice(&[0, 1, 0, 0, 0, 1, b'7', 0, 0]);
                        let n = (b.len() - 1) as u32;
                        b[1..5].copy_from_slice(&n.to_be_bytes());
                    }
                    b
                }
                4 | 5 => {
                    let mut e = execute(pick(&mut rng, &names).as_bytes());
                    if rng.random_bool(0.3) {
                        let len = e.len();
                        e[len - 4..].copy_from_slice(&1u32.to_be_bytes());
                    }
                    e
                }
                6 => {
                    let kind = if rng.random_bool(0.5) { b'S' } else { b'P' };
                    let mut body = vec![kind];
                    body.extend_from_slice(pick(&mut rng, &names).as_bytes());
                    body.push(0);
                    message(b'D', &body)
                }
                7 => {
                    let kind = if rng.random_bool(0.5) { b'S' } else { b'P' };
                    let mut body = vec![kind];
                    body.extend_from_slice(pick(&mut rng, &names).as_bytes());
                    body.push(0);
                    message(b'C', &body)
                }
                8 => sync(),
                9 => message(b'H', b""),
                10 => query(pick(&mut rng, &queries).as_bytes()),
                11 => match rng.random_range(0..3) {
                    0 => message(b'c', b""),
                    1 => message(b'f', b"stop\0"),
                    _ => message(b'd', b"x\n"),
                },
                12 => {
                    // FunctionCall of pg_backend_pid() (OID 2026), no arguments, text result.
                    let mut body = 2026u32.to_be_bytes().to_vec();
                    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
                    message(b'F', &body)
                }
                _ => sync(),
            };
            batch.push(m);
        }
        // End the round where the server certainly answers: a Sync, then a sentinel query.
        batch.push(sync());
        let sentinel = format!("ROLLBACK; SELECT 'end-{round}'");
        batch.push(query(sentinel.as_bytes()));
        let mut bytes = Vec::new();
        for m in &batch {
            if let Action::Replace(_) = state.on_frontend(&ctx, m[0], m) {
                mismatches += 1;
            }
            bytes.extend_from_slice(m);
            sent += 1;
        }
        raw.send(&bytes).await;
        let want = format!("end-{round}");
        let mut seen = false;
        let mut got = Vec::new();
        loop {
            let Some((tag, body)) = raw.recv().await else {
                let sent: Vec<String> = batch
                    .iter()
                    .map(|m| format!("{}{:?}", m[0] as char, String::from_utf8_lossy(&m[5..])))
                    .collect();
                panic!(
                    "round {round}: the server closed the connection\ngot {got:?}\nsent {sent:?}"
                );
            };
            got.push(match tag {
                b'E' => format!("E[{}]", common::raw::field(&body, b'M').unwrap_or_default()),
                t => (t as char).to_string(),
            });
            if let Action::Replace(_) = state.on_backend(&ctx, tag, &message(tag, &body)) {
                mismatches += 1;
            }
            if tag == b'D' && String::from_utf8_lossy(&body).contains(&want) {
                seen = true;
            }
            if tag == b'Z' && seen {
                break;
            }
        }
        if state.expected_replies() != 0 {
            let sent: Vec<String> = batch
                .iter()
                .map(|m| format!("{}{:?}", m[0] as char, String::from_utf8_lossy(&m[5..])))
                .collect();
            panic!(
                "round {round} (seed {seed}): the model still expects {} replies\nsent {sent:?}\ngot {got:?}",
                state.expected_replies()
            );
        }
    }
    assert_eq!(mismatches, 0, "seed {seed}");
    eprintln!("{sent} messages in {round} rounds, 0 mismatches");
}

/// A rule can demand schema-qualified names in signed statements: a token that lists `DROP TABLE t` is
/// refused when set (an unqualified name resolves through the session's search_path), one that lists
/// `DROP TABLE public.t` works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_can_require_schema_qualified_names() {
    let direct = setup("si_qualified").await;
    let g = gate_with(|c| {
        policy(c);
        for r in &mut c.rules {
            r.require_qualified_names = true;
        }
    })
    .await;
    let c = g.client("si_qualified").await;
    let loose = sign(&payload("si_qualified", &["DROP TABLE t"]), &["alice"]);
    let detail = rejected(
        &c.batch_execute(&set_token(&loose)).await.unwrap_err(),
        "malformed",
    );
    assert!(
        detail.contains("require_qualified_names") && detail.contains("t"),
        "{detail}"
    );
    held(&c.batch_execute("DROP TABLE t").await.unwrap_err());
    assert!(exists(&direct, "t").await);
    let strict = sign(
        &payload("si_qualified", &["DROP TABLE public.t"]),
        &["alice"],
    );
    c.batch_execute(&set_token(&strict)).await.unwrap();
    c.batch_execute("DROP TABLE public.t").await.unwrap();
    assert!(!exists(&direct, "t").await);
}
