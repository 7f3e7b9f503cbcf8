"""PostgreSQL whole-database fidelity: database properties, roles, and the restore's comparison.

One source database (with a comment, database and role-in-database settings, database grants,
an owner role, a sequence, a function, a view, an index, a constraint and a large object) is
backed up once per module; each test restores it somewhere (in place, a new name, a new server
with and without its roles) and checks the result by an independent means: catalog queries of
the shared catalogs and a plain ``pg_dump`` of both sides.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import dagster as dg
import pytest

from rag_backup.defs import postgres as pg_defs
from rag_backup.defs.resources import BackupRepositoryResource, PostgresResource
from rag_backup.devstack import DevStack
from rag_backup.devstack.postgres_server import scram_sha256_verifier
from rag_backup.engines import postgres as engine
from rag_backup.engines.postgres import archive as pg_catalog
from rag_backup.engines.postgres import roles as pg_roles
from rag_backup.errors import IntegrityError, InvalidRequest, ToolError
from rag_backup.repository import BackupRepository, FilesystemBackend, Verification
from rag_backup.repository.manifest import utcnow
from rag_backup_tests import pgutil

STACK_SERVICES = ("postgres",)  # the stores these tests need (see conftest)
PARTITION = utcnow().strftime("%Y-%m-%d")
TAG = uuid.uuid4().hex[:6]
OWNER, READER, GROUP = f"fid_owner_{TAG}", f"fid_reader_{TAG}", f"fid_group_{TAG}"
SOURCE = f"fid_src_{TAG}"

SCHEMA = f"""
SET ROLE {OWNER};
CREATE SCHEMA app;
CREATE TABLE app.items (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL,
    qty int NOT NULL
);
ALTER TABLE app.items ADD CONSTRAINT items_qty_positive CHECK (qty > 0) NOT VALID;
ALTER TABLE app.items ADD CONSTRAINT items_name_unique UNIQUE (name);
INSERT INTO app.items (name, qty) SELECT 'वस्तु ' || g, g FROM generate_series(1, 200) g;
CREATE INDEX items_qty_idx ON app.items (qty);
CREATE SEQUENCE app.ticket_seq;
SELECT setval('app.ticket_seq', 31337);
CREATE VIEW app.big_items AS SELECT id, name FROM app.items WHERE qty > 100;
CREATE FUNCTION app.double_qty(n int) RETURNS int LANGUAGE sql IMMUTABLE AS $$ SELECT n * 2 $$;
SELECT lo_from_bytea(0, convert_to('a large object', 'UTF8'));
RESET ROLE;
"""


def database_properties_sql(db: str) -> str:
    return f"""
COMMENT ON DATABASE {db} IS 'fidelity: the ''source'' database';
ALTER DATABASE {db} SET search_path TO app, public;
ALTER DATABASE {db} SET "TimeZone" TO 'Asia/Kolkata';
ALTER ROLE {READER} IN DATABASE {db} SET statement_timeout TO '7s';
REVOKE ALL ON DATABASE {db} FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {READER};
"""


# -- independent views of a database -------------------------------------------------------

SNAPSHOT_SQL = """
SELECT pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datcollate, d.datctype,
       d.datacl::text, sd.description,
       (SELECT array_agg(coalesce(pg_get_userbyid(nullif(s.setrole, 0)), '*') || ':' || c
                         ORDER BY 1)
        FROM pg_db_role_setting s, unnest(s.setconfig) c WHERE s.setdatabase = d.oid)
FROM pg_database d
LEFT JOIN pg_shdescription sd ON sd.objoid = d.oid AND sd.classoid = 'pg_database'::regclass
WHERE d.datname = %s
"""


def snapshot(server: engine.PostgresServer, database: str) -> dict:
    """The database's row of the shared catalogs: owner, encoding, collation, ACL, comment,
    settings (``*:name=value``) and role-in-database settings (``role:name=value``)."""
    conn = pgutil.admin(server)
    try:
        with conn.cursor() as cur:
            cur.execute(SNAPSHOT_SQL, (database,))
            row = cur.fetchone()
    finally:
        conn.close()
    assert row is not None, f"no database {database!r}"
    return dict(zip(("owner", "encoding", "collate", "ctype", "acl", "comment", "settings"), row))


def role_row(server: engine.PostgresServer, role: str) -> tuple | None:
    rows = pgutil.execute(server, "postgres", f"""
        SELECT a.rolcanlogin, a.rolconnlimit, a.rolpassword, r.rolconfig,
               ARRAY(SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                     WHERE m.member = a.oid ORDER BY 1)
        FROM pg_authid a JOIN pg_roles r ON r.oid = a.oid WHERE a.rolname = '{role}'""")
    return rows[0] if rows else None


def differences(comparison) -> set[tuple[str, str]]:
    return {(d.item, d.property) for d in comparison.differences}


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(pg, tmp_path_factory) -> Iterator[dict]:
    """The source database and its roles on the stack's server, backed up and verified once."""
    password = scram_sha256_verifier(secrets.token_hex(16))
    conn = pgutil.admin(pg)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE ROLE {OWNER} LOGIN PASSWORD %s", (password,))
            cur.execute(f"CREATE ROLE {GROUP} NOLOGIN")
            cur.execute(f"CREATE ROLE {READER} LOGIN CONNECTION LIMIT 5 IN ROLE {GROUP}")
            cur.execute(f"ALTER ROLE {READER} SET work_mem = '8MB'")
            cur.execute(f"CREATE DATABASE {SOURCE} OWNER {OWNER}")
            cur.execute(database_properties_sql(SOURCE))
    finally:
        conn.close()
    pgutil.execute(pg, SOURCE, SCHEMA)
    repo_dir = tmp_path_factory.mktemp("fidelity-repo")
    repo = BackupRepository(FilesystemBackend(repo_dir))
    with repo.begin("postgres", PARTITION, "fidelity") as pending:
        pending.commit(engine.backup(pg, pending, databases=[SOURCE]))
    record = repo.get("postgres", PARTITION)
    repo.record_verification("postgres", PARTITION, Verification(
        record.backup_id, True, utcnow(), "fidelity", engine.verify(repo, record)))
    info = {"repo": repo, "repo_dir": repo_dir, "record": repo.get("postgres", PARTITION),
            "snapshot": snapshot(pg, SOURCE), "dump": pgutil.plain_dump(pg, SOURCE)}
    try:
        yield info
    finally:
        for name in pgutil.databases(pg):
            if TAG in name:
                pgutil.drop_database(pg, name)
        for role in (READER, GROUP, OWNER):
            pgutil.execute(pg, "postgres", f"DROP ROLE IF EXISTS {role}")


@pytest.fixture(scope="module")
def new_server(tmp_path_factory) -> Iterator:
    """Starts fresh PostgreSQL servers (none of the source's roles) on demand; stops them all."""
    with ExitStack() as stops:
        def start(name: str) -> engine.PostgresServer:
            stack = DevStack(root=tmp_path_factory.mktemp(name), services=("postgres",))
            stops.callback(stack.down)
            env = stack.up(seed=False)
            return engine.PostgresServer(env["RAG_PG_HOST"], int(env["RAG_PG_PORT"]),
                                         env["RAG_PG_USER"], env["RAG_PG_PASSWORD"])
        yield start


def test_the_source_has_what_the_tests_look_for(source):
    snap = source["snapshot"]
    assert snap["owner"] == OWNER and snap["comment"] == "fidelity: the 'source' database"
    assert sorted(snap["settings"]) == sorted(
        ["*:search_path=app, public", "*:TimeZone=Asia/Kolkata",
         f"{READER}:statement_timeout=7s"])
    assert f"{READER}=Tc/{OWNER}" in snap["acl"] and "=Tc/" not in snap["acl"].replace(
        f"{READER}=Tc/", "")
    assert "SELECT pg_catalog.setval('app.ticket_seq', 31337, true);" in source["dump"]
    assert "lo_create" in source["dump"] and "CREATE VIEW app.big_items" in source["dump"]


def test_in_place_restore_brings_back_every_database_property(pg, source):
    pgutil.execute(pg, "postgres", f"""
        ALTER DATABASE {SOURCE} RESET ALL;
        COMMENT ON DATABASE {SOURCE} IS NULL;
        ALTER ROLE {READER} IN DATABASE {SOURCE} RESET ALL;
        REVOKE CONNECT, TEMPORARY ON DATABASE {SOURCE} FROM {READER}""")
    pgutil.execute(pg, SOURCE, "DROP VIEW app.big_items; SELECT setval('app.ticket_seq', 5)")
    assert snapshot(pg, SOURCE) != source["snapshot"]
    before = pgutil.databases(pg)

    report = engine.restore(source["repo"], source["record"], pg, source_database=SOURCE,
                            target_database=SOURCE, confirm=SOURCE)

    assert report.replaced_existing and report.matches_manifest, report.comparison.summary()
    assert report.comparison.not_run == {} and report.comparison.differences == []
    assert report.comparison.compared["database_properties"] >= 8
    assert report.comparison.compared["sequence_values"] == 2  # ticket_seq and items' identity
    assert report.comparison.compared["objects"] >= 8
    assert report.roles_created == []
    assert snapshot(pg, SOURCE) == source["snapshot"]
    assert pgutil.plain_dump(pg, SOURCE) == source["dump"]
    assert pgutil.databases(pg) == before  # no staging or replaced copy left


def test_restore_into_a_new_name_carries_the_properties_over(pg, source):
    target = f"fid_copy_{TAG}"
    report = engine.restore(source["repo"], source["record"], pg, source_database=SOURCE,
                            target_database=target)
    assert report.matches_manifest, report.comparison.summary()
    assert snapshot(pg, target) == source["snapshot"]
    assert pgutil.plain_dump(pg, target) == source["dump"]
    # the comparison names the target (not the source) when the copy drifts
    pgutil.execute(pg, "postgres", f"COMMENT ON DATABASE {target} IS 'changed'")
    found = engine.compare_database(source["repo"], source["record"], pg, SOURCE, target)
    assert differences(found) == {(f"database {target}", "comment")}


def test_compare_database_names_each_property_dropped_from_a_restored_copy(pg, source):
    target = f"fid_cmp_{TAG}"
    engine.restore(source["repo"], source["record"], pg, source_database=SOURCE,
                   target_database=target)
    clean = engine.compare_database(source["repo"], source["record"], pg, SOURCE, target)
    assert clean.matches and clean.differences == [] and clean.not_run == {}

    pgutil.execute(pg, "postgres", f"""
        ALTER DATABASE {target} RESET search_path;
        COMMENT ON DATABASE {target} IS NULL;
        ALTER ROLE {READER} IN DATABASE {target} RESET statement_timeout;
        REVOKE TEMPORARY ON DATABASE {target} FROM {READER}""")
    pgutil.execute(pg, target, """
        SELECT setval('app.ticket_seq', 1);
        DROP INDEX app.items_qty_idx;
        DELETE FROM app.items WHERE id <= 3;
        CREATE TABLE app.extra (x int)""")
    found = engine.compare_database(source["repo"], source["record"], pg, SOURCE, target)

    assert not found.matches
    db = f"database {target}"
    assert differences(found) == {
        (db, "setting search_path"), (db, "comment"),
        (db, f"setting statement_timeout of role {READER}"), (db, f"privileges of {READER}"),
        ("SEQUENCE app.ticket_seq", "last_value"), ("INDEX app.items_qty_idx", "present"),
        ("TABLE app.items", "rows"), ("TABLE app.extra", "present"), ("TABLE app.extra", "rows")}
    by_prop = {(d.item, d.property): d for d in found.differences}
    assert by_prop[(db, "setting search_path")].expected == "app, public"
    assert by_prop[(db, "setting search_path")].actual is None
    assert by_prop[("SEQUENCE app.ticket_seq", "last_value")].expected == 31337
    assert by_prop[(db, f"privileges of {READER}")].actual == "CONNECT"
    assert by_prop[("TABLE app.items", "rows")].actual == 197


def job_resources(server: engine.PostgresServer, repo_dir: Path) -> dict:
    return {"repository": BackupRepositoryResource(location=str(repo_dir)),
            "postgres": PostgresResource(host=server.host, port=server.port, user=server.user,
                                         password=server.password)}


def test_new_server_disaster_path_restore_roles_through_the_job(pg, source, new_server):
    fresh = new_server("fresh")
    assert role_row(fresh, OWNER) is None and role_row(fresh, READER) is None
    run = pg_defs.restore_postgres_job.execute_in_process(
        run_config=dg.RunConfig(ops={"restore_postgres": pg_defs.RestorePostgresConfig(
            source_database=SOURCE, target_database=SOURCE, restore_roles=True)}),
        resources=job_resources(fresh, source["repo_dir"]),
        instance=dg.DagsterInstance.ephemeral())
    assert run.success
    out = run.output_for_node("restore_postgres")
    assert out["matches_manifest"] and out["comparison"]["not_run"] == {}
    assert {OWNER, READER, GROUP} <= set(out["roles_created"])
    assert not {"rag_admin", "ragqa_user", "dagster"} & set(out["roles_created"])
    output_meta = next(e.event_specific_data.metadata for e in run.all_events
                       if e.event_type_value == "STEP_OUTPUT")
    assert output_meta["matches_manifest"].value is True
    assert set(output_meta["roles_created"].value) >= {OWNER, READER, GROUP}
    assert output_meta["compared_database_properties"].value >= 8
    assert output_meta["differences"].value == 0
    assert "PASSWORD" not in str(output_meta) and "SCRAM" not in str(output_meta)

    # independent: the shared catalogs, a plain pg_dump, and the roles themselves
    assert snapshot(fresh, SOURCE) == snapshot(pg, SOURCE) == source["snapshot"]
    assert pgutil.plain_dump(fresh, SOURCE) == source["dump"]
    for role in (OWNER, READER, GROUP):
        assert role_row(fresh, role) == role_row(pg, role), role
    assert role_row(fresh, READER)[4] == [GROUP]
    assert role_row(fresh, READER)[3] == ["work_mem=8MB"]


def test_new_server_without_roles_fails_before_the_target_and_names_what_is_missing(
        source, new_server):
    bare = new_server("bare")
    repo, record = source["repo"], source["record"]
    before = pgutil.databases(bare)
    with pytest.raises(ToolError, match=f'role "{OWNER}" does not exist'):
        engine.restore(repo, record, bare, source_database=SOURCE, target_database=SOURCE)
    with pytest.raises(IntegrityError) as caught:
        engine.restore(repo, record, bare, source_database=SOURCE, target_database=SOURCE,
                       no_owner=True)
    message = str(caught.value)
    assert f"setting statement_timeout of role {READER}" in message
    assert f"privileges of {READER}" in message and "was not touched" in message
    assert pgutil.databases(bare) == before  # neither the target nor a staging copy

    report = engine.restore(repo, record, bare, source_database=SOURCE, target_database=SOURCE,
                            no_owner=True, accept_differences=True)
    db = f"database {SOURCE}"
    assert not report.matches_manifest
    assert differences(report.comparison) == {
        (db, f"setting statement_timeout of role {READER}"), (db, f"privileges of {READER}")}
    snap = snapshot(bare, SOURCE)
    assert snap["owner"] == bare.user  # no_owner: the connecting user owns it
    assert snap["comment"] == source["snapshot"]["comment"]
    assert sorted(snap["settings"]) == ["*:TimeZone=Asia/Kolkata", "*:search_path=app, public"]
    assert pgutil.execute(bare, SOURCE, "SELECT last_value FROM app.ticket_seq") == [(31337,)]


def test_restore_roles_leaves_an_existing_role_alone_unless_asked(pg, source, new_server):
    server = new_server("existing")
    pgutil.execute(server, "postgres", f"CREATE ROLE {READER} NOLOGIN CONNECTION LIMIT 1")
    repo, record = source["repo"], source["record"]
    with pytest.raises(InvalidRequest, match="set restore_roles too"):
        engine.restore(repo, record, server, source_database=SOURCE,
                       target_database=f"fid_a_{TAG}", update_existing_roles=True)
    first = engine.restore(repo, record, server, source_database=SOURCE,
                           target_database=f"fid_a_{TAG}", restore_roles=True)
    assert {OWNER, GROUP} <= set(first.roles_created) and READER not in first.roles_created
    assert first.roles_updated == []
    assert role_row(server, READER)[:2] == (False, 1)
    assert role_row(server, READER)[3] is None and role_row(server, READER)[4] == []
    assert first.matches_manifest, first.comparison.summary()

    second = engine.restore(repo, record, server, source_database=SOURCE,
                            target_database=f"fid_b_{TAG}", restore_roles=True,
                            update_existing_roles=True)
    assert second.roles_created == [] and READER in second.roles_updated
    assert server.user not in second.roles_updated
    assert role_row(server, READER) == role_row(pg, READER)


# -- the parsers on their own (no server) ------------------------------------------------------

GLOBALS = r'''
\restrict abc
SET default_transaction_read_only = off;
CREATE ROLE "Odd ""Name""";
ALTER ROLE "Odd ""Name""" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN
    NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 3 VALID UNTIL '2030-01-01 00:00:00+00'
    PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a:b';
CREATE ROLE grp;
ALTER ROLE grp WITH NOLOGIN;
COMMENT ON ROLE grp IS 'the group''s comment';
ALTER ROLE "Odd ""Name""" SET search_path TO 'a', 'b';
GRANT grp TO "Odd ""Name""" WITH ADMIN OPTION, INHERIT TRUE GRANTED BY postgres;
CREATE TABLESPACE fast OWNER postgres LOCATION '/mnt/fast';
ALTER ROLE grp WITH SOMETHING_NEW;
\unrestrict abc
'''


def test_globals_are_parsed_into_roles_memberships_and_tablespaces():
    parsed = pg_roles.parse_globals(GLOBALS)
    odd = parsed.roles['Odd "Name"']
    assert "LOGIN" in odd.attributes and odd.connection_limit == 3
    assert odd.valid_until == "2030-01-01 00:00:00+00" and odd.password.startswith("SCRAM-")
    assert odd.settings == {"search_path": ["a", "b"]}
    assert parsed.roles["grp"].comment == "the group's comment"
    assert parsed.memberships == [pg_roles.Membership("grp", 'Odd "Name"', True)]
    assert parsed.tablespaces == ["fast"]
    assert len(parsed.unsupported) == 1 and "SOMETHING_NEW" in parsed.unsupported[0]
    assert "SCRAM" not in str(parsed.unsupported) + repr(odd)


def test_database_statements_are_rebuilt_for_the_new_name_only(pg):
    sql_text = '''
--
-- Name: src; Type: DATABASE; Schema: -; Owner: own
--
CREATE DATABASE src WITH TEMPLATE = template0 ENCODING = 'UTF8' LOCALE_PROVIDER = libc
    LOCALE = 'C.UTF-8';
ALTER DATABASE src OWNER TO own;
--
-- Name: src; Type: DATABASE PROPERTIES; Schema: -; Owner: own
--
ALTER DATABASE src SET search_path TO 'app', 'src';
ALTER DATABASE other SET work_mem TO '1MB';
ALTER ROLE "r; DROP" IN DATABASE src SET statement_timeout TO '5s';
--
-- Name: DATABASE src; Type: ACL; Schema: -; Owner: own
--
REVOKE ALL ON DATABASE src FROM PUBLIC;
GRANT CONNECT ON DATABASE src TO "r; DROP" WITH GRANT OPTION;
'''
    props = pg_catalog.database_properties(pg_catalog.parse_sql_dump(sql_text.splitlines()))
    assert props.owner == "own" and props.lc_collate() == "C.UTF-8"
    assert props.settings == {"search_path": "app, src"}
    assert len(props.unsupported) == 1 and "other" in props.unsupported[0]
    assert props.expected_acl("own") == {"(owner)": {"CREATE", "CONNECT", "TEMPORARY"},
                                         "r; DROP": {"CONNECT*"}}
    conn = pgutil.admin(pg)  # only to render the statements (quoting follows the server)
    try:
        rendered = [(what, s.as_string(conn)) for what, s in
                    pg_catalog.database_statements(props, 'new "db"', apply_owner=True)]
    finally:
        conn.close()
    new = '"new ""db"""'
    assert rendered == [
        ("owner", f'ALTER DATABASE {new} OWNER TO "own"'),
        ("setting search_path", f"ALTER DATABASE {new} SET \"search_path\" TO 'app', 'src'"),
        ("role r; DROP setting statement_timeout",
         f'ALTER ROLE "r; DROP" IN DATABASE {new} SET "statement_timeout" TO \'5s\''),
        ("privileges of PUBLIC",
         f"REVOKE CREATE, CONNECT, TEMPORARY ON DATABASE {new} FROM PUBLIC"),
        ("privileges of r; DROP",
         f'GRANT CONNECT ON DATABASE {new} TO "r; DROP" WITH GRANT OPTION'),
    ]
