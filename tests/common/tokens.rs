//! Helpers for tests that mint and present step-up tokens with the test keys in fixtures/keys.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::gnupg::GnuPg;
use super::serve::BIN;
use super::*;
use sequoia_openpgp::parse::Parse;
use sequoia_openpgp::Cert;
use stepgate::classify::Classifier;
use stepgate::config::Config;
use stepgate::token::new_uuid;
use stepgate::token::payload::{fingerprint_of, Payload, StatementGrant};
use stepgate::token::signed::sign_cleartext;
use stepgate::token::verify::class_of;

pub const INSTANCE: &str = "ci-1";

pub fn keys_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/keys")
}

pub fn key_fingerprint(name: &str) -> String {
    std::fs::read_to_string(keys_dir().join("fingerprints.txt"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
        .unwrap_or_else(|| panic!("no test key {name}"))
}

/// The policy of these tests, as a user writes it (state_dir is added per gate).
pub fn policy_toml() -> String {
    let signer = |name: &str, dbs: &str| {
        format!(
            "[[signer]]\nname = \"{name}\"\nfingerprint = \"{}\"\ndatabases = [{dbs}]\n",
            key_fingerprint(name)
        )
    };
    format!(
        "instance = \"{INSTANCE}\"\nkeyring = \"{}\"\n{}{}{}{}\
         [[rule]]\ndatabase = \"two_*\"\nsignatures = 2\n\
         [[rule]]\ndatabase = \"*\"\nmax_token_lifetime = \"1h\"\n",
        keys_dir().join("keyring").display(),
        signer("alice", "\"*\""),
        signer("bob", "\"two_*\", \"tok_bob*\""),
        signer("carol", "\"*\""),
        signer("dave", "\"*\""),
    )
}

pub fn policy(c: &mut Config) {
    let parsed = Config::from_toml(&policy_toml(), Path::new("/"), "test policy").unwrap();
    c.instance = parsed.instance;
    c.keyring = parsed.keyring;
    c.signers = parsed.signers;
    c.rules = parsed.rules;
}

/// The policy as a config file for the command line, pointing at the gate's state directory.
pub fn config_file(g: &Gate, dir: &Path) -> PathBuf {
    let path = dir.join("stepgate.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = \"{}\"\n{}",
            g.state_dir().display(),
            policy_toml()
        ),
    )
    .unwrap();
    path
}

pub fn secret(name: &str) -> Cert {
    Cert::from_file(keys_dir().join(format!("{name}.sec.asc"))).unwrap()
}

pub fn payload(database: &str, sqls: &[&str]) -> Payload {
    Payload {
        id: new_uuid(),
        instance: Some(INSTANCE.into()),
        database: database.into(),
        user: None,
        not_before: None,
        not_after: SystemTime::now() + Duration::from_secs(600),
        statements: sqls
            .iter()
            .map(|s| StatementGrant {
                fingerprint: fingerprint_of(s).unwrap(),
                class: class_of(&Classifier::default(), s).unwrap(),
                sql: s.to_string(),
            })
            .collect(),
        reason: Some("stepgate tests".into()),
    }
}

pub fn sign_text_at(text: &str, who: &[&str], at: SystemTime) -> String {
    let certs: Vec<Cert> = who.iter().map(|n| secret(n)).collect();
    String::from_utf8(sign_cleartext(text.as_bytes(), &certs, at).unwrap()).unwrap()
}

pub fn sign(p: &Payload, who: &[&str]) -> String {
    sign_text_at(&p.render(), who, SystemTime::now())
}

pub fn set_token(token: &str) -> String {
    format!("SET stepgate.token = '{}'", token.replace('\'', "''"))
}

/// Runs the stepgate binary; returns (success, stdout, stderr).
pub fn stepgate(args: &[&str], stdin: &[u8]) -> (bool, Vec<u8>, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .env_remove("STEPGATE_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh database with table `t` (and `t2`, `t3`), made directly on PostgreSQL.
pub async fn setup(db: &str) -> tokio_postgres::Client {
    pg().create_db(db).await;
    let c = pg().direct_to(db).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2), (3);
         CREATE TABLE t2 (a int); CREATE TABLE t3 (a int)",
    )
    .await
    .unwrap();
    c
}

pub async fn exists(direct: &tokio_postgres::Client, table: &str) -> bool {
    direct
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .unwrap()
        .get(0)
}

/// Asserts a held refusal and returns (held id, DETAIL).
pub fn held(e: &tokio_postgres::Error) -> (String, String) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e:?}"));
    assert_eq!(db.code().code(), "42501", "{db:?}");
    assert!(
        db.message().starts_with("stepgate: statement held ("),
        "{db:?}"
    );
    let detail = db.detail().unwrap().to_string();
    (detail[8..16].to_string(), detail)
}

/// Asserts the SET of a token failed with 28000 and `code`; returns the DETAIL.
pub fn rejected(e: &tokio_postgres::Error, code: &str) -> String {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e:?}"));
    assert_eq!(db.code().code(), "28000", "{db:?}");
    assert_eq!(
        db.message(),
        format!("stepgate: token rejected ({code})"),
        "{db:?}"
    );
    db.detail().unwrap_or_default().to_string()
}

pub fn events<'a>(audit: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
    audit.iter().filter(|r| r["event"] == event).collect()
}

pub fn gpg_with(keys: &[&str]) -> GnuPg {
    let gpg = GnuPg::new();
    for k in keys {
        gpg.import(&keys_dir().join(format!("{k}.sec.asc")));
    }
    gpg
}

/// Rows in `table`, counted over `client`.
pub async fn count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Writes `<dir>/stepgate.toml`: listen on `port`, the shared server upstream, `state_dir = "state"` and the
/// test policy.
pub fn serve_config(dir: &Path, port: u16) -> PathBuf {
    let config = dir.join("stepgate.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nupstream = \"{}\"\nstate_dir = \"state\"\n{}",
            pg().addr(),
            policy_toml()
        ),
    )
    .unwrap();
    config
}
