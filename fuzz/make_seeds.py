#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into fuzz/seeds/<target>/ (run from the repository root).

classify_differential: every case of fixtures/classify/cases.txt, the statements of fixtures/app-queries,
fixtures/migrations and fixtures/sql, and the attack inputs of issue 14. The other targets: a few valid
messages, startup packets and tokens."""
import glob, hashlib, os, struct

def write(target, items):
    out = f"fuzz/seeds/{target}"
    os.makedirs(out, exist_ok=True)
    for b in items:
        with open(os.path.join(out, hashlib.sha1(b).hexdigest()), "wb") as f:
            f.write(b)

seeds = []
for line in open("fixtures/classify/cases.txt", encoding="utf-8"):
    line = line.rstrip("\n")
    if line and not line.startswith("#") and "|" in line:
        seeds.append(line.split("|", 1)[1].strip().replace("\\n", "\n"))
for f in sorted(glob.glob("fixtures/app-queries/*.sql") + glob.glob("fixtures/migrations/*.sql") + glob.glob("fixtures/sql/*.sql")):
    for st in open(f, encoding="utf-8", errors="replace").read().split(";\n"):
        st = st.strip()
        if st and len(st) < 4000:
            seeds.append(st)
seeds += [
    "SELECT begin atomic FROM (SELECT 1 AS begin) s; DROP TABLE t",
    "SELECT E'a'\n'\\' , ' ; DROP TABLE t ; --'",
    "SELECT E'a'\n-- c\n'\\' , ' ; COPY (SELECT 1) TO PROGRAM 'id' ; --'",
    "SELECT U&\"pg_read_file\"('/etc/hostname')",
    "SELECT U&\"pg_terminate_backend\" UESCAPE '!' (12345)",
    "EXPLAIN (U&\"analyze\") DELETE FROM t",
    "EXPLAIN (ANALYSE) DELETE FROM t",
    "EXPLAIN (ANALYZE off, ANALYZE on) DELETE FROM t",
    "SELECT query_to_xml('select lo_export(424242, ''proof.bin'')', true, true, '')",
    "DELETE FROM t WHERE EXISTS (SELECT 1)",
    "DELETE FROM t WHERE (SELECT true)",
    "DELETE FROM t WHERE (id) = id",
    "DELETE FROM t WHERE id = t.id",
    "DELETE FROM t WHERE id IS NOT DISTINCT FROM id",
    "DELETE FROM t WHERE NOT (id <> id)",
    "MERGE INTO t USING (SELECT 1) s ON true WHEN MATCHED AND true THEN DELETE",
    "DELETE FROM t WHERE 1::int = 1.4::int",
    "SELECT pg_copy_physical_replication_slot('a','b')",
    "SELECT lo_truncate(0, 0); SELECT pg_stat_reset()",
    "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END; DROP TABLE t",
    "SELECT $$;$$; DROP TABLE t",
    "SELECT /* /* */ ; */ 1; DROP TABLE t",
    "SET standard_conforming_strings = off; SELECT 'a\\'; DROP TABLE t; --'",
]
write("classify_differential", [s.encode() for s in seeds])

def msg(t, body):
    return t + struct.pack(">I", len(body) + 4) + body
write("frame_scanner", [
    b"\x07" + msg(b"Q", b"select 1\x00") + msg(b"X", b""),
    b"\x03" + msg(b"P", b"s\x00select $1\x00\x00\x00") + msg(b"B", b"\x00s\x00\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00") + msg(b"E", b"\x00\x00\x00\x00\x00") + msg(b"S", b""),
    b"\x01" + msg(b"d", b"x" * 300) + msg(b"c", b""),
])

def startup(params):
    body = struct.pack(">I", 196608) + b"".join(k + b"\x00" + v + b"\x00" for k, v in params) + b"\x00"
    return struct.pack(">I", len(body) + 4) + body
write("startup_packet", [
    startup([(b"user", b"app"), (b"database", b"db")]),
    startup([(b"user", b"dba"), (b"database", b"stepgate"), (b"user", b"app")]),
    startup([(b"user", b"a"), (b"options", b"-c stepgate.token=abc -c work_mem=1MB")]),
    startup([(b"user", b"a"), (b"stepgate.token", b"x"), (b"options", b"--stepgate.token=y\\ z")]),
    struct.pack(">II", 8, 80877103),
    struct.pack(">IIii", 16, 80877102, 1, 2),
])
write("token", [
    b"stepgate-token: 1\nid: 7d4c0a6e-5b1f-4f0e-9a53-2f1e9c0b8d11\ninstance: prod-eu1\ndatabase: app\nuser: migrator\nnot-after: 2026-11-28T21:00:00Z\nstatement: sha256:" + b"0" * 64 + b" destructive \"DROP TABLE staging_orders\"\n",
    b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nstepgate-token: 1\n-----BEGIN PGP SIGNATURE-----\n\niQ==\n-----END PGP SIGNATURE-----\n",
])
