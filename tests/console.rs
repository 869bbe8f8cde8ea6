//! The DBA console (virtual database `stepgate`): password admins get tables over psql and over the extended
//! protocol; non-admins and admins let in by trust are refused; every command is audited; tokens never show.

mod common;

use std::process::{Command, Stdio};

use common::tokens::*;
use common::*;

/// A config file whose `[admin]` names the password roles and the trusted superuser.
fn console_config(dir: &std::path::Path, extra_admin: &str) -> std::path::PathBuf {
    let path = dir.join("stepgate.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = \"state\"\n{}[admin]\nusers = [\"{SCRAM_USER}\", \"{MD5_USER}\", \"{}\"]\n{extra_admin}",
            policy_toml(),
            pg().user
        ),
    )
    .unwrap();
    path
}

/// psql as a person runs it (aligned output), with a password when given.
fn psql_console(g: &Gate, user: &str, password: Option<&str>, sql: &str) -> (bool, String, String) {
    let mut c = Command::new("psql");
    c.arg(format!(
        "host=127.0.0.1 port={} user={user} dbname=stepgate sslmode=disable",
        g.addr.port()
    ))
    .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", sql])
    .env_remove("PGPASSWORD")
    .env_remove("PGOPTIONS")
    .stdin(Stdio::null());
    if let Some(p) = password {
        c.env("PGPASSWORD", p);
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_admin_reviews_held_statements_and_others_are_refused() {
    if pg().devdb().is_none() {
        return; // DATABASE_URL: the password roles are the throwaway server's
    }
    let direct = setup("con_db").await;
    let dir = tempfile::tempdir().unwrap();
    let g = gate_from_file(&console_config(dir.path(), "")).await;
    let c = g.client("con_db").await;
    let (id, _) = held(&c.batch_execute("DROP TABLE t").await.unwrap_err());
    // A held statement a token later ran reads as authorized.
    let (ran, _) = held(&c.batch_execute("DROP TABLE t3").await.unwrap_err());
    let t3 = sign(&payload("con_db", &["DROP TABLE t3"]), &["alice"]);
    c.batch_execute(&set_token(&t3)).await.unwrap();
    c.batch_execute("DROP TABLE t3").await.unwrap();
    let tok = sign(&payload("con_db", &["DROP TABLE t2"]), &["alice"]);
    c.batch_execute(&set_token(&tok)).await.unwrap();

    let run = |user: &'static str, pw: Option<&'static str>, sql: &'static str| {
        let g = &g;
        tokio::task::block_in_place(move || psql_console(g, user, pw, sql))
    };
    // SHOW HELD as a table.
    let (ok, out, err) = run(SCRAM_USER, Some(SCRAM_PASSWORD), "SHOW HELD");
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap();
    for col in ["id", "status", "database", "class", "sql"] {
        assert!(header.contains(col), "{out}");
    }
    assert!(out.contains(&id) && out.contains("DROP TABLE t"), "{out}");
    assert!(out.contains("(2 rows)"), "{out}");
    let line = out.lines().find(|l| l.contains(&ran)).unwrap();
    assert!(line.contains("authorized"), "{out}");

    // One held statement, with the payload to sign; md5 works too.
    let sql: &'static str = Box::leak(format!("SHOW HELD {id}").into_boxed_str());
    let (ok, out, err) = run(MD5_USER, Some(MD5_PASSWORD), sql);
    assert!(ok, "{err}");
    assert!(out.contains("stepgate-token: 1"), "{out}");
    assert!(out.contains("destructive \"DROP TABLE t\""), "{out}");

    // The audit view never shows a token.
    let (ok, out, err) = run(SCRAM_USER, Some(SCRAM_PASSWORD), "SHOW AUDIT 50");
    assert!(ok, "{err}");
    assert!(out.contains("token_set"), "{out}");
    assert!(!out.contains("BEGIN PGP"), "{out}");
    let sig_line = tok
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN PGP SIGNATURE"))
        .nth(2)
        .unwrap();
    assert!(!out.contains(sig_line), "{out}");

    for (sql, needle) in [
        ("SHOW SESSIONS", "con_db"),
        ("SHOW SIGNERS", "alice"),
        ("SHOW STATS", "audit_head"),
        ("SHOW CONFIG", "admin_users"),
        ("HELP", "DISMISS <id>"),
        // A command added as one file (src/proxy/console/commands/show_version.rs) is listed and runs.
        ("HELP", "SHOW VERSION"),
        ("SHOW VERSION", env!("CARGO_PKG_VERSION")),
        ("RELOAD", "RELOAD 2"),
    ] {
        let (ok, out, err) = run(SCRAM_USER, Some(SCRAM_PASSWORD), sql);
        assert!(ok, "{sql}: {err}");
        assert!(out.contains(needle), "{sql}: {out}");
    }
    let (ok, _, err) = run(SCRAM_USER, Some(SCRAM_PASSWORD), "DROP TABLE t");
    assert!(!ok && err.contains("unknown command"), "{err}");

    // A non-admin, and an admin name the upstream lets in by trust, are refused.
    let (ok, _, err) = run(CLEARTEXT_USER, Some(CLEARTEXT_PASSWORD), "SHOW HELD");
    assert!(!ok);
    assert!(err.contains("may not open the stepgate console"), "{err}");
    let trusted: &'static str = Box::leak(pg().user.clone().into_boxed_str());
    let (ok, _, err) = run(trusted, None, "SHOW HELD");
    assert!(!ok);
    assert!(err.contains("needs a password login"), "{err}");
    // A wrong password is the upstream's own refusal.
    let (ok, _, err) = run(SCRAM_USER, Some("wrong"), "SHOW HELD");
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );

    // The extended protocol (what drivers use): tokio-postgres query() and DISMISS.
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(g.addr.port())
        .user(SCRAM_USER)
        .password(SCRAM_PASSWORD)
        .dbname("stepgate");
    let admin = connect(cfg).await.unwrap();
    let rows = admin.query("SHOW HELD", &[]).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, &str>("id"), id);
    assert_eq!(rows[0].get::<_, &str>("status"), "held");
    admin.batch_execute(&format!("DISMISS {id}")).await.unwrap();
    let rows = admin.query("SHOW HELD", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, &str>("status"), "dismissed");
    let stats = admin.simple_query("SHOW STATS").await.unwrap();
    assert!(format!("{stats:?}").contains("statements_held"));

    // Every command is audited, refusals included.
    let audit = g.audit();
    let actions: Vec<String> = audit
        .iter()
        .filter(|r| r["event"] == "admin_action")
        .map(|r| {
            format!(
                "{} {}",
                r["command"].as_str().unwrap(),
                r["outcome"].as_str().unwrap()
            )
        })
        .collect();
    assert!(actions.iter().any(|a| a == "SHOW HELD ok"), "{actions:?}");
    assert!(
        actions.iter().any(|a| a.starts_with("login refused")),
        "{actions:?}"
    );
    assert!(
        actions.iter().any(|a| a == &format!("DISMISS {id} ok")),
        "{actions:?}"
    );
    assert!(exists(&direct, "t").await);
}

#[tokio::test]
async fn the_console_on_its_own_address() {
    if pg().devdb().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = stepgate::devdb::free_port();
    let g = gate_from_file(&console_config(
        dir.path(),
        &format!("listen = \"127.0.0.1:{port}\"\n"),
    ))
    .await;
    // On the main address, `stepgate` is an ordinary database name (passed to the upstream).
    let mut cfg = g.config(SCRAM_USER, "stepgate");
    cfg.password(SCRAM_PASSWORD);
    let e = connect_err(cfg).await;
    assert_eq!(sqlstate(&e).as_deref(), Some("3D000"), "{e:?}");
    // On the admin address only the console is served.
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(SCRAM_USER)
        .password(SCRAM_PASSWORD);
    let admin = connect(cfg.clone().dbname("stepgate").to_owned())
        .await
        .unwrap();
    assert!(!admin.query("HELP", &[]).await.unwrap().is_empty());
    let e = connect_err(cfg.dbname("postgres").to_owned()).await;
    assert_eq!(sqlstate(&e).as_deref(), Some("3D000"), "{e:?}");
}

/// The admin list is policy: a RELOAD that removes a user closes that user's open console session at once
/// (idle, between commands) and refuses the next login; SHOW CONFIG shows the list that is enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_admin_by_reload_locks_them_out_at_once() {
    if pg().devdb().is_none() {
        return; // DATABASE_URL: the password roles are the throwaway server's
    }
    let dir = tempfile::tempdir().unwrap();
    let path = console_config(dir.path(), "");
    let g = gate_from_file(&path).await;
    let admin_cfg = |user: &str, password: &str| {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(g.addr.port())
            .user(user)
            .password(password)
            .dbname("stepgate");
        cfg
    };
    let scram = connect(admin_cfg(SCRAM_USER, SCRAM_PASSWORD))
        .await
        .unwrap();
    let md5 = connect(admin_cfg(MD5_USER, MD5_PASSWORD)).await.unwrap();
    let users = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
        rows.into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("admin_users") => {
                    r.get(1).map(str::to_string)
                }
                _ => None,
            })
            .unwrap()
    };
    assert!(users(scram.simple_query("SHOW CONFIG").await.unwrap()).contains(SCRAM_USER));

    // The file no longer names the SCRAM admin; another admin reloads.
    std::fs::write(
        &path,
        format!(
            "state_dir = \"state\"\n{}[admin]\nusers = [\"{MD5_USER}\"]\n",
            policy_toml()
        ),
    )
    .unwrap();
    md5.batch_execute("RELOAD").await.unwrap();

    // The removed admin's idle session was closed by the server with its reason.
    for _ in 0..100 {
        if scram.is_closed() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        scram.is_closed(),
        "the removed admin's console session is still open"
    );
    let err = scram.simple_query("SHOW HELD").await.unwrap_err();
    assert!(err.is_closed(), "{err}");
    // A new login is refused; the remaining admin sees the list in force.
    let err = connect_err(admin_cfg(SCRAM_USER, SCRAM_PASSWORD)).await;
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{err}");
    assert!(
        format!("{err:?}").contains("may not open the stepgate console"),
        "{err}"
    );
    let shown = users(md5.simple_query("SHOW CONFIG").await.unwrap());
    assert_eq!(shown, MD5_USER);
    let audit = g.audit();
    assert!(
        audit.iter().any(|r| r["event"] == "admin_action"
            && r["user"] == SCRAM_USER
            && r["outcome"] == "closed: no longer an admin user"),
        "no audit record of the closed session"
    );
}

/// Console errors carry their SQLSTATE: an unknown command is a syntax error, a bad argument an invalid
/// value, a held id that does not exist an undefined object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_errors_carry_their_sqlstate() {
    if pg().devdb().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let g = gate_from_file(&console_config(dir.path(), "")).await;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(g.addr.port())
        .user(SCRAM_USER)
        .password(SCRAM_PASSWORD)
        .dbname("stepgate");
    let admin = connect(cfg).await.unwrap();
    for (sql, code, words) in [
        ("DROP TABLE t", "42601", "unknown command"),
        ("SHOW AUDIT lots", "22023", "is not a number of records"),
        ("DISMISS nothere", "22023", "is not a held id"),
        ("DISMISS abcd1234", "42704", "no held statement abcd1234"),
        ("SHOW HELD abcd1234", "42704", "no held statement abcd1234"),
    ] {
        let err = admin.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some(code), "{sql}: {err}");
        assert!(format!("{:?}", err).contains(words), "{sql}: {err:?}");
    }
}

/// Issue 18: `stepgate approve` hands a signed token to the running gate through the console. A session that
/// never set a token then runs the statements it lists, each once; what it does not list stays held; the
/// approval survives a restart, and the log verifies with its `approved` record (the admin who approved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_token_covers_any_session_of_its_database_once() {
    if pg().devdb().is_none() {
        return; // DATABASE_URL: the password roles are the throwaway server's
    }
    let db = "con_approve";
    let direct = setup(db).await;
    let dir = tempfile::tempdir().unwrap();
    let mut g = gate_from_file(&console_config(dir.path(), "")).await;
    let tok = sign(
        &payload(db, &["DROP TABLE t2", "DROP TABLE t3"]),
        &["alice"],
    );
    let file = dir.path().join("0042.asc");
    std::fs::write(&file, &tok).unwrap();
    let c = g.client(db).await;
    held(&c.batch_execute("DROP TABLE t2").await.unwrap_err());

    let approve = |g: &Gate, file: &std::path::Path| {
        let console = format!(
            "host=127.0.0.1 port={} user={SCRAM_USER} dbname=stepgate sslmode=disable",
            g.addr.port()
        );
        let out = tokio::task::block_in_place(|| {
            Command::new(common::serve::BIN)
                .args(["approve", "--console", &console])
                .arg(file)
                .env("PGPASSWORD", SCRAM_PASSWORD)
                .env_remove("STEPGATE_CONFIG")
                .output()
                .unwrap()
        });
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = approve(&g, &file);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("statements 2") && out.contains("alice"),
        "{out}"
    );

    // A session without a token: the listed DROP runs once, the unlisted one is held.
    let c2 = g.client(db).await;
    c2.batch_execute("DROP TABLE t2").await.unwrap();
    assert!(!exists(&direct, "t2").await);
    direct
        .batch_execute("CREATE TABLE t2 (a int)")
        .await
        .unwrap();
    let (_, detail) = held(&c2.batch_execute("DROP TABLE t2").await.unwrap_err());
    assert!(!detail.contains("token"), "{detail}");
    assert!(exists(&direct, "t2").await);
    held(&c2.batch_execute("DROP TABLE t").await.unwrap_err());

    // The same token again: refused, exit 1. Not a token at all: refused with the reason.
    let (code, _, err) = approve(&g, &file);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("approved already"), "{err}");
    let junk = dir.path().join("junk.asc");
    std::fs::write(&junk, "hello").unwrap();
    let (code, _, err) = approve(&g, &junk);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("token rejected"), "{err}");

    // After a restart the approval is still in force for what is left of it.
    drop((c, c2));
    g.restart().await;
    let c3 = g.client(db).await;
    c3.batch_execute("DROP TABLE t3").await.unwrap();
    assert!(!exists(&direct, "t3").await);

    let records = g.audit();
    let approved: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "approved")
        .collect();
    assert_eq!(approved.len(), 1, "{approved:?}");
    assert_eq!(approved[0]["user"], SCRAM_USER);
    let files = stepgate::audit::log_files(g.state_dir());
    let keyring = stepgate::token::signed::Keyring::load(&keys_dir().join("keyring")).unwrap();
    let report = stepgate::audit_tool::verify(&files, Some(&keyring), None).unwrap();
    assert!(report.ok, "{:?}", report.error);
    assert_eq!(report.authorizations, 2);
}

/// A psql that runs one statement through stepgate (`-c` each), its stderr read as it comes.
struct Waiter {
    child: std::process::Child,
    stderr: std::sync::mpsc::Receiver<String>,
    seen: String,
}

impl Waiter {
    fn start(g: &Gate, db: &str, commands: &[&str]) -> Waiter {
        use std::io::BufRead;
        let mut cmd = Command::new("psql");
        cmd.arg(format!(
            "host=127.0.0.1 port={} user={} dbname={db} sslmode=disable",
            g.addr.port(),
            pg().user
        ))
        .args(["-X", "-v", "ON_ERROR_STOP=1"]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        let mut child = cmd
            .env_remove("PGPASSWORD")
            .env_remove("PGOPTIONS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Waiter {
            child,
            stderr: rx,
            seen: String::new(),
        }
    }

    /// What psql printed on stderr once a line contains `words` (panics after `within`).
    fn until(&mut self, words: &str, within: std::time::Duration) -> String {
        let end = std::time::Instant::now() + within;
        while !self.seen.contains(words) {
            let left = end.saturating_duration_since(std::time::Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                }
                Err(_) => panic!(
                    "psql did not print {words:?} in time; it printed:\n{}",
                    self.seen
                ),
            }
        }
        self.seen.clone()
    }

    /// psql's exit status, its stdout and all of its stderr (panics after `within`).
    fn finish(mut self, within: std::time::Duration) -> (bool, String, String) {
        let end = std::time::Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > end {
                let _ = self.child.kill();
                while let Ok(line) = self.stderr.recv_timeout(std::time::Duration::from_secs(1)) {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                }
                panic!("psql did not finish in time; it printed:\n{}", self.seen);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut out = String::new();
        use std::io::Read;
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        while let Ok(line) = self.stderr.recv_timeout(std::time::Duration::from_secs(2)) {
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        (status.success(), out, self.seen)
    }
}

async fn has_column(c: &tokio_postgres::Client, col: &str) -> bool {
    c.query_one(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 't' AND column_name = $1",
        &[&col],
    )
    .await
    .unwrap()
    .get::<_, i64>(0)
        == 1
}

/// A psql whose statement now waits for an approval (its NOTICE printed whole), and the held id.
fn waiting(g: &Gate, db: &str, sql: &str) -> (Waiter, String) {
    tokio::task::block_in_place(|| {
        let mut waiter = Waiter::start(g, db, &[sql]);
        let notice = waiter.until("HINT:", std::time::Duration::from_secs(10));
        (waiter, held_id_in(&notice))
    })
}

fn held_id_in(text: &str) -> String {
    let at = text
        .find("held id ")
        .unwrap_or_else(|| panic!("no held id in {text}"))
        + 8;
    text[at..at + 8].to_string()
}

/// Issue 18, wait mode: under `on_hold = "wait"` a held `ALTER TABLE` in psql waits instead of failing; psql
/// shows a NOTICE at once with the held id and the command that approves it; the console's SHOW HELD lists
/// it as waiting; `stepgate approve` with a token that covers it lets it run, and psql prints ALTER TABLE.
/// When the wait times out it fails as a held statement always did (same held id), and a later approval
/// does not run it. Inside a transaction block nothing waits. Both relays (they write the NOTICE apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_statement_runs_once_approved_and_fails_when_the_wait_ends() {
    if pg().devdb().is_none() {
        return; // DATABASE_URL: the password roles are the throwaway server's
    }
    use std::time::{Duration, Instant};
    for (i, options) in relays().into_iter().enumerate() {
        let (db, short) = (format!("wait_{i}"), format!("waitq_{i}"));
        let direct = setup(&db).await;
        let direct_short = setup(&short).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stepgate.toml");
        let rules = "[[rule]]\ndatabase = \"waitq_*\"\non_hold = \"wait\"\nwait_timeout = \"2s\"\n\
                     [[rule]]\ndatabase = \"wait_*\"\non_hold = \"wait\"\nwait_timeout = \"40s\"\n[[rule]]";
        std::fs::write(
            &path,
            format!(
                "state_dir = \"state\"\n{}[admin]\nusers = [\"{SCRAM_USER}\"]\n",
                policy_toml().replacen("[[rule]]", rules, 1)
            ),
        )
        .unwrap();
        let g = gate_from_file_with(&path, options).await;
        let approve = |file: &std::path::Path| {
            let out = Command::new(common::serve::BIN)
                .args([
                    "approve",
                    "--console",
                    &format!(
                        "host=127.0.0.1 port={} user={SCRAM_USER} dbname=stepgate sslmode=disable",
                        g.addr.port()
                    ),
                ])
                .arg(file)
                .env("PGPASSWORD", SCRAM_PASSWORD)
                .env_remove("STEPGATE_CONFIG")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // Signs (alice) a token for `sql` in `db`, writes it as `name` and approves it.
        let approve_sql = |name: &str, db: &str, sql: &str| {
            let file = dir.path().join(name);
            std::fs::write(&file, sign(&payload(db, &[sql]), &["alice"])).unwrap();
            tokio::task::block_in_place(|| approve(&file));
        };
        // It waits: the NOTICE comes at once, the console lists it as waiting, nothing ran.
        let alter = "ALTER TABLE t ADD COLUMN b int";
        let mut waiter = tokio::task::block_in_place(|| Waiter::start(&g, &db, &[alter]));
        let notice = tokio::task::block_in_place(|| waiter.until("HINT:", Duration::from_secs(10)));
        assert!(
            notice.contains("NOTICE:  stepgate: statement held (ddl), held id "),
            "{notice}"
        );
        assert!(
            notice.contains("waiting up to 40s for an approval"),
            "{notice}"
        );
        assert!(notice.contains("stepgate approve --config"), "{notice}");
        let id = held_id_in(&notice);
        let (ok, shown, err) = tokio::task::block_in_place(|| {
            psql_console(
                &g,
                SCRAM_USER,
                Some(SCRAM_PASSWORD),
                &format!("SHOW HELD {id}"),
            )
        });
        assert!(ok, "{err}");
        assert!(shown.contains("waiting"), "{shown}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !has_column(&direct, "b").await,
            "it ran before it was approved"
        );

        // Approved with a token that covers it: it runs, psql reports success.
        let file = dir.path().join(format!("{id}.asc"));
        std::fs::write(&file, sign(&payload(&db, &[alter]), &["alice"])).unwrap();
        let approved_at = Instant::now();
        tokio::task::block_in_place(|| approve(&file));
        let (ok, out, err) = tokio::task::block_in_place(|| waiter.finish(Duration::from_secs(15)));
        assert!(ok, "relay {i}: {out}{err}");
        assert!(out.contains("ALTER TABLE"), "{out}");
        assert!(approved_at.elapsed() < Duration::from_secs(10));
        assert!(has_column(&direct, "b").await);
        let records = g.audit();
        let of = |event: &str| records.iter().filter(|r| r["event"] == event).count();
        assert!(records
            .iter()
            .any(|r| r["event"] == "held" && r["held_id"] == id.as_str()));
        assert_eq!(of("approved"), 1);
        assert_eq!(of("authorized"), 1, "{records:?}");
        assert_eq!(of("executed"), 1);
        // It ran: a DISMISS now cannot pretend otherwise.
        let (ok, _, err) = tokio::task::block_in_place(|| {
            psql_console(
                &g,
                SCRAM_USER,
                Some(SCRAM_PASSWORD),
                &format!("DISMISS {id}"),
            )
        });
        assert!(
            !ok && err.contains("was authorized") && err.contains("cannot be dismissed"),
            "{err}"
        );

        // Dismissed in the console while it waits: it fails at once, and nothing ran.
        let (waiter, id) = waiting(&g, &db, "DROP TABLE t3");
        let (ok, _, err) = tokio::task::block_in_place(|| {
            psql_console(
                &g,
                SCRAM_USER,
                Some(SCRAM_PASSWORD),
                &format!("DISMISS {id}"),
            )
        });
        assert!(ok, "{err}");
        let (ok, _, err) = tokio::task::block_in_place(|| waiter.finish(Duration::from_secs(10)));
        assert!(!ok);
        assert!(
            err.contains(&format!(
                "held id {id}; dismissed in the stepgate console while it waited"
            )),
            "{err}"
        );
        assert!(exists(&direct, "t3").await);

        // DISMISS, then at once an approval that covers it: the dismissal wins, nothing runs, and the
        // approval's use is left for another session.
        let (waiter, id) = waiting(&g, &db, "TRUNCATE t");
        let file = dir.path().join("truncate.asc");
        std::fs::write(&file, sign(&payload(&db, &["TRUNCATE t"]), &["alice"])).unwrap();
        let (ok, _, err) = tokio::task::block_in_place(|| {
            psql_console(
                &g,
                SCRAM_USER,
                Some(SCRAM_PASSWORD),
                &format!("DISMISS {id}"),
            )
        });
        assert!(ok, "{err}");
        tokio::task::block_in_place(|| approve(&file));
        let (ok, _, err) = tokio::task::block_in_place(|| waiter.finish(Duration::from_secs(10)));
        assert!(!ok, "{err}");
        assert!(err.contains("dismissed in the stepgate console"), "{err}");
        let rows: i64 = direct
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert!(rows > 0, "relay {i}: TRUNCATE ran after its DISMISS");
        g.client(&db)
            .await
            .batch_execute("TRUNCATE t")
            .await
            .unwrap();
        let rows: i64 = direct
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 0);
        direct
            .batch_execute("INSERT INTO t VALUES (1), (2), (3)")
            .await
            .unwrap();

        // psql's Ctrl-C (a CancelRequest) ends the wait: it fails at once, and nothing ran.
        let (waiter, id) = waiting(&g, &db, "DROP TABLE t3");
        let interrupted = Command::new("kill")
            .args(["-INT", &waiter.child.id().to_string()])
            .status()
            .unwrap();
        assert!(interrupted.success());
        let started = Instant::now();
        let (ok, _, err) = tokio::task::block_in_place(|| waiter.finish(Duration::from_secs(10)));
        assert!(!ok);
        assert!(started.elapsed() < Duration::from_secs(5), "{err}");
        assert!(
            err.contains(&format!(
                "held id {id}; canceled by the client while it waited"
            )),
            "{err}"
        );
        assert!(exists(&direct, "t3").await);

        // The client leaves while it waits: the wait ends, and an approval afterwards runs nothing.
        let (mut waiter, id) = waiting(&g, &db, "DROP TABLE t3");
        waiter.child.kill().unwrap();
        waiter.child.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        approve_sql("t3.asc", &db, "DROP TABLE t3");
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            exists(&direct, "t3").await,
            "relay {i}: ran for a client that left"
        );
        let (_, shown, _) = tokio::task::block_in_place(|| {
            psql_console(
                &g,
                SCRAM_USER,
                Some(SCRAM_PASSWORD),
                &format!("SHOW HELD {id}"),
            )
        });
        assert!(!shown.contains("waiting"), "{shown}");

        // A client that sends more behind the waiting statement, or closes its side together with the query,
        // and then leaves: it is seen leaving all the same (raw clients, so the timing is the attacker's).
        for (n, how) in ["more", "half-close"].into_iter().enumerate() {
            use tokio::io::AsyncWriteExt;
            let col = format!("e{n}");
            let sql = format!("ALTER TABLE t ADD COLUMN {col} int");
            let mut r = common::raw::Raw::login(g.addr, &pg().user, &db, &[]).await;
            r.send(&common::raw::query(sql.as_bytes())).await;
            if how == "half-close" {
                r.stream.shutdown().await.unwrap();
            }
            let (tag, _) = r.recv().await.unwrap();
            assert_eq!(tag, b'N', "relay {i}, {how}: no NOTICE");
            if how == "more" {
                r.send(&common::raw::query(b"SELECT 1")).await;
            }
            drop(r);
            tokio::time::sleep(Duration::from_millis(500)).await;
            approve_sql(&format!("{col}.asc"), &db, &sql);
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert!(
                !has_column(&direct, &col).await,
                "relay {i}, {how}: ran for a client that left"
            );
        }

        // A reload while it waits applies to it: under the new rule for its user (two signatures) an
        // approval signed by one person (valid for the database's other users) does not run it.
        let strict = format!(
            "[[rule]]\ndatabase = \"wait_*\"\nuser = \"{}\"\nsignatures = 2\non_hold = \"wait\"\nwait_timeout = \"40s\"\n{rules}",
            pg().user
        );
        std::fs::write(
            &path,
            format!(
                "state_dir = \"state\"\n{}[admin]\nusers = [\"{SCRAM_USER}\"]\n",
                policy_toml().replacen("[[rule]]", &strict, 1)
            ),
        )
        .unwrap();
        let (waiter, id) = waiting(&g, &db, "ALTER TABLE t ADD COLUMN f int");
        g.handle().reload().unwrap();
        approve_sql("f.asc", &db, "ALTER TABLE t ADD COLUMN f int");
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !has_column(&direct, "f").await,
            "relay {i}: judged under the old policy: {:#?}",
            g.audit().iter().rev().take(6).collect::<Vec<_>>()
        );
        let (ok, _, err) = tokio::task::block_in_place(|| {
            psql_console(
                &g,
                SCRAM_USER,
                Some(SCRAM_PASSWORD),
                &format!("DISMISS {id}"),
            )
        });
        assert!(ok, "{err}");
        let (ok, _, _) = tokio::task::block_in_place(|| waiter.finish(Duration::from_secs(10)));
        assert!(!ok);
        std::fs::write(
            &path,
            format!(
                "state_dir = \"state\"\n{}[admin]\nusers = [\"{SCRAM_USER}\"]\n",
                policy_toml().replacen("[[rule]]", rules, 1)
            ),
        )
        .unwrap();
        g.handle().reload().unwrap();

        // A cancel sent right behind the query (before its NOTICE, while the hold is being recorded) ends
        // the wait too; the approval that follows runs nothing.
        let c = g.client(&db).await;
        let cancel = c.cancel_token();
        let running = tokio::spawn(async move {
            let r = c.simple_query("ALTER TABLE t ADD COLUMN g int").await;
            (c, r)
        });
        cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let (_c, r) = tokio::time::timeout(Duration::from_secs(10), running)
            .await
            .expect("a cancelled wait ends at once")
            .unwrap();
        let err = r.unwrap_err();
        assert!(
            err.as_db_error().is_some_and(|e| e
                .message()
                .contains("canceled by the client while it waited")),
            "relay {i}: {err:?}"
        );
        approve_sql("g.asc", &db, "ALTER TABLE t ADD COLUMN g int");
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !has_column(&direct, "g").await,
            "relay {i}: ran after its cancel"
        );

        // With the extended protocol it fails at once, saying why it did not wait.
        let c = g.client(&db).await;
        let started = Instant::now();
        let err = c.execute("DROP TABLE t2", &[]).await.unwrap_err();
        let db_err = err.as_db_error().unwrap();
        assert_eq!(db_err.code().code(), "42501");
        assert!(
            db_err
                .message()
                .ends_with("; not waiting for an approval: sent with the extended protocol"),
            "{db_err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(exists(&direct, "t2").await);

        // Inside a transaction block it fails at once.
        let started = Instant::now();
        let block = tokio::task::block_in_place(|| {
            Waiter::start(
                &g,
                &db,
                &["BEGIN", "ALTER TABLE t ADD COLUMN c int", "COMMIT"],
            )
            .finish(Duration::from_secs(20))
        });
        assert!(!block.0, "{block:?}");
        assert!(
            block.2.contains("statement held (ddl)")
                && block
                    .2
                    .contains("; not waiting for an approval inside a transaction block")
                && !block.2.contains("waiting up to"),
            "{block:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(!has_column(&direct, "c").await);

        // No approval in time: the ALTER is refused with the same held id; an approval afterwards runs nothing.
        let started = Instant::now();
        let late_alter = "ALTER TABLE t ADD COLUMN d int";
        let (ok, _, err) = tokio::task::block_in_place(|| {
            Waiter::start(&g, &short, &[late_alter]).finish(Duration::from_secs(20))
        });
        assert!(!ok);
        assert!(started.elapsed() >= Duration::from_secs(2), "{err}");
        assert!(err.contains("waiting up to 2s"), "{err}");
        let id = held_id_in(&err);
        assert!(
            err.contains(&format!("ERROR:  stepgate: statement held (ddl), held id {id}; no approval covered it within 2s")),
            "{err}"
        );
        assert!(!has_column(&direct_short, "d").await);
        approve_sql("late.asc", &short, late_alter);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!has_column(&direct_short, "d").await);
        let (_, shown, _) = tokio::task::block_in_place(|| {
            psql_console(
                &g,
                SCRAM_USER,
                Some(SCRAM_PASSWORD),
                &format!("SHOW HELD {id}"),
            )
        });
        assert!(
            shown.contains("held") && !shown.contains("waiting"),
            "{shown}"
        );
        // Every wait's evidence (held, approved, authorized/executed, released after a DISMISS won) verifies.
        let files = stepgate::audit::log_files(g.state_dir());
        let keyring = stepgate::token::signed::Keyring::load(&keys_dir().join("keyring")).unwrap();
        let report = stepgate::audit_tool::verify(&files, Some(&keyring), None).unwrap();
        assert!(report.ok, "relay {i}: {:?}", report.error);
    }
}
