//! The tree judge on PostgreSQL's own parse trees.

use super::*;
use crate::config::Class;

fn class(sql: &str) -> (Class, String) {
    let stmts = parse(sql, true).unwrap();
    let dangerous = |n: &str| n == "pg_read_file" || n == "lo_export";
    let mut best = (Class::Read, String::new());
    for (_, _, t) in stmts {
        let v = judge(&t, &dangerous);
        if v.class >= best.0 {
            best = (v.class, v.reason);
        }
    }
    best
}

#[test]
fn table() {
    use Class::*;
    for (sql, want) in [
        ("SELECT 1", Read),
        ("SELECT * FROM t WHERE id = 1 FOR UPDATE", Write),
        ("SELECT * INTO x FROM t", Ddl),
        ("DELETE FROM t", Destructive),
        ("DELETE FROM t WHERE id = 1", Write),
        ("DELETE FROM t WHERE false", Write),
        ("DELETE FROM t WHERE EXISTS (SELECT 1)", Destructive),
        ("DELETE FROM t WHERE (SELECT true)", Destructive),
        ("DELETE FROM t WHERE (id) = id", Destructive),
        ("DELETE FROM t WHERE id = t.id", Destructive),
        ("DELETE FROM t AS x WHERE x.id = id", Destructive),
        (
            "DELETE FROM t WHERE id IS NOT DISTINCT FROM id",
            Destructive,
        ),
        ("DELETE FROM t WHERE NOT (id <> id)", Destructive),
        ("DELETE FROM t WHERE id = 3 OR true", Destructive),
        ("DELETE FROM t WHERE id IN (1, id)", Destructive),
        ("DELETE FROM t WHERE 1::int = 1.4::int", Destructive),
        ("DELETE FROM t WHERE '1'::int = '01'::int", Destructive),
        ("DELETE FROM t WHERE 'a'::char(3) = 'a  '", Destructive),
        ("DELETE FROM t WHERE 1e400 > 1e399", Destructive),
        ("DELETE FROM t WHERE 'a' < 'B'", Destructive),
        (
            "DELETE FROM t WHERE EXISTS (SELECT 1 FROM o WHERE o.tid = t.id)",
            Write,
        ),
        (
            "UPDATE t SET a = 1 FROM (SELECT 1 AS one) s WHERE one = 1",
            Destructive,
        ),
        ("UPDATE t SET a = o.a FROM o WHERE t.id = o.id", Write),
        (
            "MERGE INTO t USING (SELECT 1) s ON true WHEN MATCHED AND true THEN DELETE",
            Destructive,
        ),
        (
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
            Write,
        ),
        (
            "MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED BY SOURCE THEN DELETE",
            Destructive,
        ),
        ("EXPLAIN DELETE FROM t", Read),
        ("EXPLAIN (ANALYZE) DELETE FROM t", Destructive),
        ("EXPLAIN (U&\"analyze\") DELETE FROM t", Destructive),
        ("EXPLAIN (ANALYSE) DELETE FROM t", Destructive),
        (
            "EXPLAIN (ANALYZE off, ANALYZE on) DELETE FROM t",
            Destructive,
        ),
        ("EXPLAIN (ANALYZE on, ANALYZE off) DELETE FROM t", Read),
        ("EXPLAIN (ANALYZE 'maybe') DELETE FROM t", Destructive),
        ("SELECT U&\"pg_read_file\"('/etc/hostname')", Privileged),
        ("SELECT pg_catalog.\"pg_read_file\"('x')", Privileged),
        (
            "SELECT query_to_xml('select lo_export(424242, ''proof.bin'')', true, true, '')",
            Privileged,
        ),
        (
            "SELECT query_to_xml('delete from t', true, true, '')",
            Destructive,
        ),
        ("SELECT query_to_xml('select 1', true, true, '')", Read),
        ("SELECT query_to_xml(q, true, true, '') FROM qs", Privileged),
        ("COPY (SELECT 1) TO PROGRAM 'id'", Privileged),
        ("COPY t FROM STDIN", Write),
        (
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            Destructive,
        ),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
            Ddl,
        ),
        ("DO $$ BEGIN END $$", Privileged),
        ("VACUUM (FULL) t", Privileged),
        ("VACUUM ANALYZE t", Session),
        ("ALTER TABLE t DROP COLUMN a", Destructive),
        ("ALTER TABLE t ADD COLUMN a int", Ddl),
        ("ALTER TABLE t OWNER TO x", Privileged),
        ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", Write),
        ("PREPARE p AS DELETE FROM t", Destructive),
        ("TABLE t", Read),
        ("COMMIT PREPARED 'x'", Session),
        ("SELECT 1 AS a INTO newt UNION SELECT 2", Ddl),
        ("SELECT 1 UNION (SELECT * FROM t FOR UPDATE)", Write),
    ] {
        let (got, why) = class(sql);
        assert_eq!(got, want, "{sql}: {why}");
    }
}

#[test]
fn unqualified_names_are_found() {
    let names = |sql: &str| -> Vec<String> {
        parse(sql, true)
            .unwrap()
            .iter()
            .flat_map(|(_, _, t)| unqualified_names(t))
            .collect()
    };
    assert_eq!(names("DROP TABLE orders"), ["orders"]);
    assert!(names("DROP TABLE sales.orders").is_empty());
    assert_eq!(names("TRUNCATE a, s.b"), ["a"]);
    assert_eq!(names("ALTER TABLE t DROP COLUMN c"), ["t"]);
    assert!(names("ALTER TABLE s.t DROP COLUMN c").is_empty());
    assert_eq!(
        names("DELETE FROM s.t WHERE id IN (SELECT id FROM u)"),
        ["u"]
    );
}

#[test]
fn what_a_rollback_undoes() {
    let nt = |sql: &str| {
        parse(sql, true)
            .unwrap()
            .iter()
            .any(|(_, _, t)| non_transactional(t))
    };
    assert!(!nt("DROP TABLE t"));
    assert!(!nt("ALTER TABLE t ADD COLUMN a int"));
    assert!(nt("CREATE INDEX CONCURRENTLY i ON t (a)"));
    assert!(nt("DROP INDEX CONCURRENTLY i"));
    assert!(nt("DELETE FROM t WHERE id = nextval('s')"));
    assert!(nt("DROP DATABASE d"));
    assert!(nt("VACUUM FULL t"));
    assert!(nt("COPY (SELECT 1) TO PROGRAM 'x'"));
}

#[test]
fn deep_inputs_are_refused_not_overflowed() {
    for sql in [
        format!("SELECT {}1", "1+".repeat(50_000)),
        format!("SELECT 1{}", "::int".repeat(50_000)),
        format!("{}SELECT 1", "EXPLAIN ANALYZE ".repeat(5_000)),
        format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000)),
    ] {
        assert!(parse(&sql, true).is_err(), "{}", &sql[..40]);
    }
}

#[test]
fn string_constants_are_read_as_postgresql_reads_them() {
    for (literal, value) in [
        ("'a''b'", Some("a'b")),
        (r"E'a\\b\nc'", Some("a\\b\nc")),
        (r"e'\x41'", Some("A")),
        (r"U&'d\0061t\+000061'", Some("data")),
        (r"U&'d!0061t' UESCAPE '!'", Some("dat")),
        ("$$it's$$", Some("it's")),
        ("$tok$a$$b$tok$", Some("a$$b")),
        ("B'101'", None),
        ("'a' || 'b'", None),
        ("'a'::text", None),
        ("1", None),
        ("'a'; SELECT 'b'", None),
    ] {
        assert_eq!(string_constant(literal).as_deref(), value, "{literal}");
    }
}
