//! Migration tools as their users run them, unchanged, through stepgate (issue 18): dbmate, knex and
//! node-pg-migrate (npm), Alembic and Django (PyPI) and sqlx-cli (crates.io), installed by `.ci/run`
//! (`target/tools/node_modules`, `target/tools/sqlx/bin`, and `alembic` and Django for the `python3` on PATH). For each:
//! without a token nothing changes in the database; `stepgate plan` runs the tool against a throwaway copy
//! of the schema and prints the payload; it is signed and handed over with `stepgate approve`; the migration
//! then applies; a run with nothing to apply passes with the tool's preset (`fixtures/allow/<tool>.toml`) and
//! no token; and a replay of the spent approval is refused.
//!
//! A tool that is not installed is skipped with a printed reason — unless STEPGATE_REQUIRE_TOOLS is set (as
//! `.ci/run` does), where a missing tool fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::tokens::*;
use common::*;

fn tools_dir() -> PathBuf {
    std::env::var_os("STEPGATE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools"))
}

/// The tool's program, or None (skip) when it is not installed and not required.
fn tool(name: &str) -> Option<PathBuf> {
    let found = match name {
        "alembic" => on_path("alembic"),
        // Django is a Python module: its test runs `python3 -m django`.
        "django" => on_path("python3").filter(|py| {
            Command::new(py)
                .args(["-c", "import django, psycopg2"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        }),
        "sqlx" => Some(tools_dir().join("sqlx/bin/sqlx")).filter(|f| f.exists()),
        _ => Some(tools_dir().join("node_modules/.bin").join(name)).filter(|f| f.exists()),
    };
    if found.is_none() {
        assert!(
            std::env::var_os("STEPGATE_REQUIRE_TOOLS").is_none(),
            "{name} is not installed (.ci/run installs it)"
        );
        eprintln!(
            "skipped: {name} is not installed (.ci/run installs it into target/tools or PATH)"
        );
    }
    found
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(program))
            .find(|f| f.is_file())
    })
}

/// A gate with the test policy, the DBA console for the password admin, and the tool's preset; the config
/// file is `dir/stepgate.toml`.
async fn gate_for(dir: &Path, preset: &str) -> Gate {
    let path = dir.join("stepgate.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = \"state\"\ninclude = [\"{}\"]\n{}[admin]\nusers = [\"{SCRAM_USER}\"]\n",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/allow")
                .join(format!("{preset}.toml"))
                .display(),
            policy_toml(),
        ),
    )
    .unwrap();
    gate_from_file(&path).await
}

/// Runs a command to its end off the runtime's worker; returns (success, stdout + stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let out = tokio::task::block_in_place(|| {
        cmd.stdin(Stdio::null())
            .env_remove("PGOPTIONS")
            .output()
            .expect("the tool runs")
    });
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The statements of the held entries recorded since `after` records.
fn held_statements(g: &Gate, after: usize) -> Vec<String> {
    g.audit()
        .into_iter()
        .skip(after)
        .filter(|r| r["event"] == "held")
        .flat_map(|r| {
            r["statements"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|s| s.as_str().map(str::to_string))
        })
        .collect()
}

/// Signs a payload (alice) and hands it over with `stepgate approve`.
fn approve(g: &Gate, dir: &Path, payload: &str) -> (Option<i32>, String) {
    let tok = sign_text_at(payload, &["alice"], std::time::SystemTime::now());
    let file = dir.join(format!("approve-{}.asc", rand_suffix()));
    std::fs::write(&file, tok).unwrap();
    let console = format!(
        "host=127.0.0.1 port={} user={SCRAM_USER} dbname=stepgate sslmode=disable",
        g.addr.port()
    );
    let out = tokio::task::block_in_place(|| {
        Command::new(common::serve::BIN)
            .args(["approve", "--console", &console])
            .arg(&file)
            .env("PGPASSWORD", SCRAM_PASSWORD)
            .env_remove("STEPGATE_CONFIG")
            .output()
            .unwrap()
    });
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn url(g: &Gate, db: &str) -> String {
    let password = pg()
        .password
        .clone()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    format!(
        "postgres://{}{password}@127.0.0.1:{}/{db}",
        pg().user,
        g.addr.port()
    )
}

/// One tool's whole flow: held without a token (nothing changes); planned, signed, approved, applied; a
/// no-op run with the preset and no token; a replay of the spent approval held. `command(work, url)` runs the
/// tool against `url` (None: the DATABASE_URL in its environment, as `stepgate plan` sets it).
async fn flow(
    name: &str,
    db: &str,
    table: &str,
    setup_dir: impl Fn(&Path, &str),
    command: impl Fn(&Path, Option<&str>) -> Command,
) {
    if tool(name).is_none() {
        return;
    }
    pg().create_db(db).await;
    let direct = pg().direct_to(db).await;
    let dir = tempfile::tempdir().unwrap();
    let g = gate_for(dir.path(), name).await;
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    setup_dir(&work, &url(&g, db));

    // Without a token: refused, and the migration's table is not there.
    let before = g.audit().len();
    let target = url(&g, db);
    let (ok, out) = run(&mut command(&work, Some(&target)));
    assert!(!ok, "{name} applied without a token: {out}");
    assert!(
        out.contains("held id "),
        "{name} does not show the held id: {out}"
    );
    assert!(!exists(&direct, table).await, "{name}: {table} exists");
    let statements = held_statements(&g, before);
    assert!(!statements.is_empty(), "{name}: nothing held");

    // Planned against a throwaway copy of the schema, signed, approved, applied — the tool unchanged.
    let tool_cmd = command(&work, None);
    let mut plan = Command::new(common::serve::BIN);
    plan.current_dir(&work)
        .arg("plan")
        .arg("--config")
        .arg(dir.path().join("stepgate.toml"))
        .args(["--database", db, "--schema-from", &target, "--"])
        .arg(tool_cmd.get_program())
        .args(tool_cmd.get_args())
        .envs(
            tool_cmd
                .get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
        );
    if let Some(p) = &pg().password {
        plan.env("PGPASSWORD", p);
    }
    let out = tokio::task::block_in_place(|| plan.stdin(Stdio::null()).output().unwrap());
    let planned = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{name}: plan failed: {summary}");
    for s in &statements {
        let fp = stepgate::token::payload::fingerprint_of(s).unwrap();
        assert!(
            planned.contains(&fp),
            "{name}: the plan misses {s}: {planned}{summary}"
        );
    }
    assert!(
        !exists(&direct, table).await,
        "{name}: plan touched the real database"
    );
    let (code, out) = approve(&g, dir.path(), &planned);
    assert_eq!(code, Some(0), "{out}");
    let (ok, out) = run(&mut command(&work, Some(&target)));
    assert!(ok, "{name} did not apply once approved: {out}");
    assert!(exists(&direct, table).await, "{name}: {table} missing");

    // Nothing to apply: passes with the preset, no token.
    let (ok, out) = run(&mut command(&work, Some(&target)));
    assert!(ok, "{name}'s no-op run failed: {out}");

    // Replay: the table dropped behind stepgate's back is not made again by the spent approval.
    direct
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    let reset = match name {
        "dbmate" => "DELETE FROM schema_migrations",
        "knex" => "DELETE FROM knex_migrations",
        "sqlx" => "DELETE FROM _sqlx_migrations",
        "node-pg-migrate" => "DELETE FROM pgmigrations",
        "django" => "DELETE FROM django_migrations",
        _ => "DELETE FROM alembic_version",
    };
    direct.batch_execute(reset).await.unwrap();
    let (ok, out) = run(&mut command(&work, Some(&target)));
    assert!(!ok, "{name} replayed a spent approval: {out}");
    assert!(!exists(&direct, table).await, "{name}: replayed");
    let files = stepgate::audit::log_files(g.state_dir());
    let report = stepgate::audit_tool::verify(&files, None, None).unwrap();
    assert!(report.ok, "{:?}", report.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbmate_migrates_once_approved_and_its_noop_run_needs_no_token() {
    if pg().devdb().is_none() {
        return; // the console's password admin is the throwaway server's
    }
    flow(
        "dbmate",
        "mt_dbmate",
        "notes",
        |work, _| {
            let m = work.join("db/migrations");
            std::fs::create_dir_all(&m).unwrap();
            std::fs::write(
                m.join("20260101000000_create_notes.sql"),
                "-- migrate:up\nCREATE TABLE notes (id serial PRIMARY KEY, body text);\n\n-- migrate:down\nDROP TABLE notes;\n",
            )
            .unwrap();
        },
        |work, url| {
            let mut c = Command::new(tool("dbmate").unwrap());
            c.current_dir(work).args([
                "--no-dump-schema",
                "--url",
                &format!("{}?sslmode=disable", url.unwrap_or("{url}")),
                "migrate",
            ]);
            c
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knex_migrates_once_approved_and_its_noop_run_needs_no_token() {
    if pg().devdb().is_none() {
        return;
    }
    flow(
        "knex",
        "mt_knex",
        "items",
        |work, _| {
            let m = work.join("migrations");
            std::fs::create_dir_all(&m).unwrap();
            std::fs::write(
                work.join("knexfile.js"),
                "module.exports = { client: 'pg', connection: process.env.DATABASE_URL, migrations: { directory: './migrations' } };\n",
            )
            .unwrap();
            std::fs::write(
                m.join("20260101000000_create_items.js"),
                "exports.up = (knex) => knex.schema.createTable('items', (t) => { t.increments('id'); t.string('name'); });\n\
                 exports.down = (knex) => knex.schema.dropTable('items');\n",
            )
            .unwrap();
        },
        |work, url| {
            let mut c = Command::new(tool("knex").unwrap());
            c.current_dir(work)
                .arg("migrate:latest")
                .env("NODE_PATH", tools_dir().join("node_modules"));
            if let Some(url) = url {
                c.env("DATABASE_URL", url);
            }
            c
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alembic_upgrades_once_approved_and_its_noop_run_needs_no_token() {
    if pg().devdb().is_none() {
        return;
    }
    flow(
        "alembic",
        "mt_alembic",
        "things",
        |work, _| {
            let v = work.join("migrations/versions");
            std::fs::create_dir_all(&v).unwrap();
            std::fs::write(
                work.join("alembic.ini"),
                "[alembic]\nscript_location = migrations\n",
            )
            .unwrap();
            std::fs::write(
                work.join("migrations/env.py"),
                "import os\nfrom alembic import context\nfrom sqlalchemy import create_engine\n\
                 engine = create_engine(os.environ['DATABASE_URL'].replace('postgres://', 'postgresql+psycopg2://', 1))\n\
                 with engine.connect() as connection:\n    context.configure(connection=connection, target_metadata=None)\n    \
                 with context.begin_transaction():\n        context.run_migrations()\n",
            )
            .unwrap();
            std::fs::write(
                work.join("migrations/script.py.mako"),
                "",
            )
            .unwrap();
            std::fs::write(
                v.join("0001_create_things.py"),
                "from alembic import op\nimport sqlalchemy as sa\nrevision = '0001'\ndown_revision = None\nbranch_labels = None\ndepends_on = None\n\
                 def upgrade():\n    op.create_table('things', sa.Column('id', sa.Integer, primary_key=True), sa.Column('name', sa.String(50)))\n\
                 def downgrade():\n    op.drop_table('things')\n",
            )
            .unwrap();
        },
        |work, url| {
            let mut c = Command::new(tool("alembic").unwrap());
            c.current_dir(work).args(["upgrade", "head"]);
            if let Some(url) = url {
                c.env("DATABASE_URL", url);
            }
            c
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_migrates_once_approved_and_its_noop_run_needs_no_token() {
    if pg().devdb().is_none() {
        return;
    }
    flow(
        "sqlx",
        "mt_sqlx",
        "gadgets",
        |work, _| {
            let m = work.join("migrations");
            std::fs::create_dir_all(&m).unwrap();
            std::fs::write(
                m.join("20260101000000_create_gadgets.sql"),
                "CREATE TABLE gadgets (id bigserial PRIMARY KEY, label text NOT NULL);\n",
            )
            .unwrap();
        },
        |work, url| {
            let mut c = Command::new(tool("sqlx").unwrap());
            c.current_dir(work)
                .args(["migrate", "run", "--source", "migrations"]);
            // sqlx reads DATABASE_URL itself; `--database-url {url}` works too.
            if let Some(url) = url {
                c.env("DATABASE_URL", url);
            }
            c
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pg_migrate_migrates_once_approved_and_its_noop_run_needs_no_token() {
    if pg().devdb().is_none() {
        return;
    }
    flow(
        "node-pg-migrate",
        "mt_npm",
        "widgets",
        |work, _| {
            let m = work.join("migrations");
            std::fs::create_dir_all(&m).unwrap();
            std::fs::write(
                m.join("1767225600000_create-widgets.js"),
                "exports.up = (pgm) => { pgm.createTable('widgets', { id: 'id', name: { type: 'text' } }); };\n\
                 exports.down = (pgm) => { pgm.dropTable('widgets'); };\n",
            )
            .unwrap();
        },
        |work, url| {
            let mut c = Command::new(tool("node-pg-migrate").unwrap());
            c.current_dir(work).args(["up", "-m", "migrations"]);
            if let Some(url) = url {
                c.env("DATABASE_URL", url);
            }
            c
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_migrates_once_approved_and_its_noop_run_needs_no_token() {
    if pg().devdb().is_none() {
        return;
    }
    flow(
        "django",
        "mt_django",
        "notes_note",
        |work, _| {
            let app = work.join("notes/migrations");
            std::fs::create_dir_all(&app).unwrap();
            std::fs::write(
                work.join("settings.py"),
                "import os\nfrom urllib.parse import urlparse\nu = urlparse(os.environ['DATABASE_URL'])\n\
                 SECRET_KEY = 'test'\nINSTALLED_APPS = ['notes']\nUSE_TZ = True\n\
                 DEFAULT_AUTO_FIELD = 'django.db.models.BigAutoField'\n\
                 DATABASES = {'default': {'ENGINE': 'django.db.backends.postgresql', 'NAME': u.path.lstrip('/'), \
                 'USER': u.username, 'PASSWORD': u.password or '', 'HOST': u.hostname, 'PORT': u.port}}\n",
            )
            .unwrap();
            std::fs::write(work.join("notes/__init__.py"), "").unwrap();
            std::fs::write(app.join("__init__.py"), "").unwrap();
            std::fs::write(
                work.join("notes/models.py"),
                "from django.db import models\nclass Note(models.Model):\n    body = models.TextField()\n",
            )
            .unwrap();
            std::fs::write(
                app.join("0001_initial.py"),
                "from django.db import migrations, models\nclass Migration(migrations.Migration):\n    initial = True\n    dependencies = []\n    \
                 operations = [migrations.CreateModel(name='Note', fields=[('id', models.BigAutoField(primary_key=True, serialize=False)), ('body', models.TextField())])]\n",
            )
            .unwrap();
        },
        |work, url| {
            let mut c = Command::new(tool("django").unwrap());
            c.current_dir(work)
                .args(["-m", "django", "migrate", "--no-input"])
                .env("DJANGO_SETTINGS_MODULE", "settings")
                .env("PYTHONPATH", work);
            if let Some(url) = url {
                c.env("DATABASE_URL", url);
            }
            c
        },
    )
    .await;
}

/// `stepgate plan --preset`: a tool's bookkeeping as `[[allow]]` entries, from a real run with no migrations —
/// how a preset for a tool not shipped is made, and how the shipped sqlx preset was. The output loads as an
/// include and lists the same statements as `fixtures/allow/sqlx.toml`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_preset_reproduces_the_shipped_sqlx_preset() {
    let Some(sqlx) = tool("sqlx") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    let mut cmd = Command::new(common::serve::BIN);
    cmd.current_dir(dir.path())
        .args(["plan", "--database", "app", "--preset", "sqlx", "--"])
        .arg(&sqlx)
        .args(["migrate", "run", "--source", "empty"])
        .env_remove("STEPGATE_CONFIG");
    let out = tokio::task::block_in_place(|| cmd.stdin(Stdio::null()).output().unwrap());
    let made = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.path().join("made.toml"), &made).unwrap();
    let fingerprints = |include: &Path| {
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            format!("include = [{:?}]\n", include.display().to_string()),
        )
        .unwrap();
        let c = stepgate::config::Config::load(Some(&cfg), &Default::default()).unwrap();
        let mut f: Vec<String> = c
            .allow
            .iter()
            .map(|a| stepgate::token::payload::fingerprint_of(a.sql.as_deref().unwrap()).unwrap())
            .collect();
        f.sort();
        f
    };
    let shipped =
        fingerprints(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/allow/sqlx.toml"));
    assert!(!shipped.is_empty());
    assert_eq!(
        fingerprints(&dir.path().join("made.toml")),
        shipped,
        "{made}"
    );
}
