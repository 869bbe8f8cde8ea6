//! Live reload: the policy changes under open sessions; a broken file is rejected and the old policy stays;
//! every attempt is audited. SIGHUP does the same for a `stepgate serve` process.

mod common;

use common::serve::Serve;
use common::tokens::*;
use common::*;

fn write_config(path: &std::path::Path, guard: &str, state: &std::path::Path) {
    // This test's rule goes first: the first matching rule wins.
    let policy = policy_toml().replacen(
        "[[rule]]",
        &format!("[[rule]]\ndatabase = \"rl_*\"\nguard = [{guard}]\n[[rule]]"),
        1,
    );
    std::fs::write(
        path,
        format!("state_dir = \"{}\"\n{policy}", state.display()),
    )
    .unwrap();
}

#[tokio::test]
async fn reload_changes_the_policy_of_open_sessions_and_a_broken_file_changes_nothing() {
    let direct = setup("rl_live").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stepgate.toml");
    let state = dir.path().join("state");
    write_config(&path, "\"destructive\"", &state);
    let g = gate_from_file(&path).await;
    let c = g.client("rl_live").await;
    held(&c.batch_execute("DROP TABLE t3").await.unwrap_err());
    c.batch_execute("CREATE INDEX t2_a ON t2 (a)")
        .await
        .unwrap();

    // Guard DDL too: the open session holds CREATE INDEX from its next statement on.
    write_config(&path, "\"destructive\", \"ddl\"", &state);
    let generation = g.handle().reload().unwrap();
    assert_eq!(generation, 2);
    held(
        &c.batch_execute("CREATE INDEX t2_b ON t2 (a)")
            .await
            .unwrap_err(),
    );

    // A broken file: the reload says why, and the policy in force stays.
    std::fs::write(&path, "state_dir = \"x\"\n[[rule]\nguard = [\n").unwrap();
    let err = g.handle().reload().unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    held(
        &c.batch_execute("CREATE INDEX t2_c ON t2 (a)")
            .await
            .unwrap_err(),
    );
    // A signer whose key is not in the keyring is rejected the same way.
    write_config(&path, "", &state);
    let text = std::fs::read_to_string(&path).unwrap()
        + "[[signer]]\nname = \"ghost\"\nfingerprint = \"0000000000000000000000000000000000000000\"\n";
    std::fs::write(&path, text).unwrap();
    let err = g.handle().reload().unwrap_err();
    assert!(err.to_string().contains("not in the keyring"), "{err}");
    held(&c.batch_execute("DROP TABLE t3").await.unwrap_err());
    assert!(exists(&direct, "t3").await);

    let audit = g.audit();
    let reloads: Vec<&str> = audit
        .iter()
        .filter(|r| r["event"] == "policy_reloaded")
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(reloads, ["applied", "rejected", "rejected"]);
}

#[test]
fn sighup_reloads_a_serve_process() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let direct = rt.block_on(setup("rl_hup"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stepgate.toml");
    let state = dir.path().join("state");
    write_config(&path, "\"destructive\"", &state);
    let port = stepgate::devdb::free_port();
    let serve = Serve::spawn(
        vec![
            "serve".into(),
            "--config".into(),
            path.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--upstream".into(),
            pg().addr(),
        ],
        port,
        tempfile::tempdir().unwrap(),
        &[],
    );
    let (ok, _, err) = psql(&serve.conninfo("rl_hup"), &["-c", "TRUNCATE t2"], &[]);
    assert!(!ok && err.contains("statement held (destructive)"), "{err}");
    write_config(&path, "", &state);
    serve.signal("-HUP");
    let mut ran = false;
    for _ in 0..50 {
        if serve.log().contains("policy reloaded") {
            ran = psql(&serve.conninfo("rl_hup"), &["-c", "TRUNCATE t2"], &[]).0;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ran, "{}", serve.log());
    let _ = direct;
}
