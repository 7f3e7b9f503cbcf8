"""A restored PostgreSQL database against its archive and the manifest.

Compares, field by field, into a :class:`Comparison`: every schema entry of the archive with a
``pg_dump --schema-only`` of the restored database (existence, owner, definition), sequence
values, large objects, populated materialized views (catalog queries), row counts against the
manifest, and the database's comment, settings, role-in-database settings, ACL, owner, encoding
and collation (shared catalogs). ``compare_database`` runs all of it on an existing database;
a restore runs it on its staging copy.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg2

from rag_backup.engines.comparison import Comparison
from rag_backup.engines.postgres.archive import (
    OWNER_MARK,
    PUBLIC,
    DatabaseProperties,
    Entry,
    SqlDump,
    _acl_by_grantee,
    _is_database_entry,
    _unpack,
    apply_database_properties,
    database_properties,
    dump_schema,
    read_archive,
)
from rag_backup.engines.postgres.common import Log, _quiet
from rag_backup.engines.postgres.fingerprint import (
    DatabaseFingerprint,
    _expected,
    fingerprint_database,
)
from rag_backup.engines.postgres.server import PostgresServer, _database_exists
from rag_backup.engines.postgres.sqltext import Unparsed, statements
from rag_backup.errors import InvalidRequest, StoreUnreachable, ToolError
from rag_backup.proc import tail
from rag_backup.repository import BackupRecord, BackupRepository


@dataclass
class DatabaseState:
    """The same properties as the restored server's shared catalogs hold them."""

    owner: str
    encoding: str
    lc_collate: str
    lc_ctype: str
    locale_provider: str | None
    icu_locale: str | None
    connection_limit: int
    comment: str | None
    settings: dict[str, str]
    role_settings: dict[str, dict[str, str]]
    acl: dict[str, set[str]]


def read_database_state(admin, database: str) -> DatabaseState:
    with admin.cursor() as cur:
        cur.execute("SELECT d.oid, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), "
                    "to_jsonb(d) FROM pg_database d WHERE d.datname = %s", (database,))
        row = cur.fetchone()
        if row is None:
            raise ToolError(f"database {database!r} vanished while it was being compared")
        oid, owner, encoding, raw = row
        cur.execute("SELECT description FROM pg_shdescription WHERE objoid = %s "
                    "AND classoid = 'pg_database'::regclass", (oid,))
        comment = cur.fetchone()
        cur.execute("SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) "
                    "END, c.item FROM pg_db_role_setting s, unnest(s.setconfig) AS c(item) "
                    "WHERE s.setdatabase = %s", (oid,))
        settings: dict[str, str] = {}
        role_settings: dict[str, dict[str, str]] = {}
        for role, item in cur.fetchall():
            name, _, value = item.partition("=")
            (settings if role is None else role_settings.setdefault(role, {}))[name] = value
        cur.execute("SELECT CASE WHEN a.grantee = 0 THEN %s WHEN a.grantee = d.datdba THEN %s "
                    "ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, a.is_grantable "
                    "FROM pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba)))"
                    " a WHERE d.oid = %s", (PUBLIC, OWNER_MARK, oid))
        acl = _acl_by_grantee({(who, priv): grantable for who, priv, grantable in cur.fetchall()})
    provider = raw.get("datlocprovider")
    return DatabaseState(owner, encoding, raw["datcollate"], raw["datctype"],
                         {"c": "libc", "i": "icu", "b": "builtin"}.get(provider, provider),
                         raw.get("daticulocale", raw.get("datlocale")), raw["datconnlimit"],
                         comment[0] if comment else None, settings, role_settings, acl)


def compare_database_properties(props: DatabaseProperties | None, fallback: dict[str, Any],
                                state: DatabaseState, comparison: Comparison, *,
                                database: str, expected_owner: str | None) -> None:
    """Comment, settings, role-in-database settings, ACL, owner, encoding and collation of the
    archive (``fallback``: the manifest's fingerprint, for backups whose archive lacks them)
    against the catalog. ``expected_owner`` overrides the archive's (``--no-owner``)."""
    item, aspect = f"database {database}", "database_properties"
    check = lambda prop, want, have: comparison.check(aspect, item, prop, want, have)  # noqa
    check("encoding", (props and props.encoding()) or fallback.get("encoding"), state.encoding)
    check("lc_collate", (props and props.lc_collate()) or fallback.get("lc_collate"),
          state.lc_collate)
    check("lc_ctype", (props and props.lc_ctype()) or fallback.get("lc_ctype"), state.lc_ctype)
    if props is None:
        comparison.skip("database properties", "the archive has no DATABASE entry (made by "
                        "pg_dump before version 11): comment, settings, ACL and owner unknown")
        return
    if "LOCALE_PROVIDER" in props.options and state.locale_provider is not None:
        check("locale_provider", props.options["LOCALE_PROVIDER"].lower(), state.locale_provider)
    if "ICU_LOCALE" in props.options:
        check("icu_locale", props.options["ICU_LOCALE"], state.icu_locale)
    owner = expected_owner or props.owner
    if owner:
        check("owner", owner, state.owner)
    check("comment", props.comment, state.comment)
    check("connection limit", -1 if props.connection_limit is None else props.connection_limit,
          state.connection_limit)
    for name in sorted(set(props.settings) | set(state.settings)):
        check(f"setting {name}", props.settings.get(name), state.settings.get(name))
    for role in sorted(set(props.role_settings) | set(state.role_settings)):
        want, have = props.role_settings.get(role, {}), state.role_settings.get(role, {})
        for name in sorted(set(want) | set(have)):
            check(f"setting {name} of role {role}", want.get(name), have.get(name))
    acl = props.expected_acl(props.owner or "")
    for who in sorted(set(acl) | set(state.acl)):
        check(f"privileges of {who}", ", ".join(sorted(acl.get(who, ()))) or None,
              ", ".join(sorted(state.acl.get(who, ()))) or None)
    for statement in props.unsupported:
        comparison.skip(f"database statement {statement}", "not a statement this restore "
                        "applies or compares (apply it by hand if needed)")


# -- objects inside the database ---------------------------------------------------------------

CATALOG_CHECKED = ("SEQUENCE SET", "BLOB", "MATERIALIZED VIEW DATA")


def _is_large_object_entry(entry: Entry) -> bool:
    return entry.type in ("COMMENT", "ACL", "SECURITY LABEL") and \
        entry.name.startswith("LARGE OBJECT ")


def object_entries(dump: SqlDump) -> list[Entry]:
    return [e for e in dump.entries if not _is_database_entry(e)]


def _first_difference(want: str, have: str) -> tuple[str, str]:
    a, b = want.splitlines(), have.splitlines()
    for x, y in zip(a, b):
        if x != y:
            return x, y
    return ("\n".join(a[len(b):][:1]) or "(end)", "\n".join(b[len(a):][:1]) or "(end)")


def compare_objects(archive: SqlDump, restored: SqlDump, comparison: Comparison, *,
                    expected_owner: str | None, definitions_why_not: str | None) -> None:
    """Every schema entry of the archive against ``pg_dump --schema-only`` of the restored
    database, both ways: present, owner, and (when both dumps come from the same major versions)
    the definition. Entries only the catalog can answer (sequence values, large objects,
    materialized view data) are left to :func:`compare_catalog_entries`."""
    def keyed(entries: Iterable[Entry]) -> dict[tuple[str, str, str], list[Entry]]:
        out: dict[tuple[str, str, str], list[Entry]] = defaultdict(list)
        for e in entries:
            if e.type not in CATALOG_CHECKED and not _is_large_object_entry(e):
                out[e.key].append(e)
        return out

    want, have = keyed(object_entries(archive)), keyed(object_entries(restored))
    if definitions_why_not:
        comparison.skip("object definitions", definitions_why_not)
    for key in sorted(set(want) | set(have)):
        wants, haves = want.get(key, []), have.get(key, [])
        label = (wants or haves)[0].label()
        comparison.count("objects", max(len(wants), len(haves)))
        if len(wants) != len(haves):
            comparison.differ(label, "present", len(wants) or False, len(haves) or False)
            continue
        for w, h in zip(wants, haves):
            owner = expected_owner if (expected_owner and w.owner) else w.owner
            if owner != h.owner:
                comparison.differ(label, "owner", owner, h.owner)
            if definitions_why_not is None and w.definition() != h.definition():
                comparison.differ(label, "definition", *_first_difference(w.definition(),
                                                                          h.definition()))


def _setval(entry: Entry) -> tuple[int, bool]:
    """``SELECT pg_catalog.setval('seq', value, is_called)`` of a SEQUENCE SET entry."""
    for tokens in statements(entry.sql):
        nums = [t.text for t in tokens if t.kind == "num"]
        flags = [t.text.lower() for t in tokens if t.kw("TRUE", "FALSE")]
        if any(t.kw("SETVAL") for t in tokens) and nums:
            return int(nums[0]), (flags[-1] == "true") if flags else True
    raise Unparsed(f"no setval in {entry.label()}")


def compare_catalog_entries(archive: SqlDump, conn, comparison: Comparison, *,
                            expected_owner: str | None) -> None:
    """Sequence values, large objects (present, owner, comment) and populated materialized
    views of the archive against the restored database's catalog (``conn`` connects to it)."""
    entries = object_entries(archive)
    with conn.cursor() as cur:
        cur.execute("SELECT schemaname, sequencename, last_value FROM pg_sequences")
        sequences = {(s, n): v for s, n, v in cur.fetchall()}
        cur.execute("SELECT m.oid::text, pg_get_userbyid(m.lomowner), d.description "
                    "FROM pg_largeobject_metadata m LEFT JOIN pg_description d "
                    "ON d.objoid = m.oid AND d.classoid = 'pg_largeobject'::regclass")
        blobs = {oid: (owner, comment) for oid, owner, comment in cur.fetchall()}
        cur.execute("SELECT n.nspname, c.relname, c.relispopulated FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'm'")
        matviews = {(s, n): p for s, n, p in cur.fetchall()}
    lo_acls = 0
    for e in entries:
        if e.type == "SEQUENCE SET":
            try:
                value, called = _setval(e)
            except Unparsed as exc:
                comparison.skip(f"value of sequence {e.schema}.{e.name}", str(exc))
                continue
            # pg_sequences shows NULL until the first nextval (is_called false)
            comparison.check("sequence_values", f"SEQUENCE {e.schema}.{e.name}", "last_value",
                             value if called else None,
                             sequences.get((e.schema, e.name), "(missing)"))
        elif e.type == "BLOB":
            found = blobs.get(e.name)
            if comparison.check("large_objects", f"LARGE OBJECT {e.name}", "present", True,
                                found is not None) and e.owner:
                comparison.check("large_objects", f"LARGE OBJECT {e.name}", "owner",
                                 expected_owner or e.owner, found[0])  # type: ignore[index]
        elif e.type == "COMMENT" and _is_large_object_entry(e):
            oid = e.name.split()[-1]
            comment = None
            for tokens in statements(e.sql):
                if tokens and tokens[0].kw("COMMENT") and tokens[-1].kind == "string":
                    comment = tokens[-1].text
            comparison.check("large_objects", f"LARGE OBJECT {oid}", "comment", comment,
                             blobs.get(oid, (None, None))[1])
        elif _is_large_object_entry(e):
            lo_acls += 1
        elif e.type == "MATERIALIZED VIEW DATA":
            comparison.check("objects", f"MATERIALIZED VIEW {e.schema}.{e.name}", "populated",
                             True, matviews.get((e.schema, e.name), False))
    if lo_acls:
        comparison.skip("large object privileges", f"{lo_acls} ACL/security label entries of "
                        "large objects are not compared (pg_dump --schema-only omits them)")


def definitions_comparable(archive: SqlDump, restored: SqlDump) -> str | None:
    """Why the SQL text of definitions cannot be compared, or None when it can: pg_dump's
    output depends on both pg_dump's and the server's major version."""
    if archive.dumped_by_major != restored.dumped_by_major:
        return (f"the archive was written by pg_dump {archive.dumped_by_major}, the restored "
                f"copy was read by pg_dump {restored.dumped_by_major}")
    if archive.dumped_from_major != restored.dumped_from_major:
        return (f"the archive comes from PostgreSQL {archive.dumped_from_major}, the restored "
                f"copy is on PostgreSQL {restored.dumped_from_major}")
    return None


def compare_rows(expected: dict[str, Any], tables: dict[str, int], large_objects: int,
                 comparison: Comparison) -> None:
    """Row counts per table and the number of large objects against the manifest."""
    want = expected["tables"]
    for table in sorted(set(want) | set(tables)):
        comparison.check("table_rows", f"TABLE {table}", "rows", want.get(table),
                         tables.get(table))
    comparison.check("large_objects", "large objects", "count", expected["large_objects"],
                     large_objects)


def _compare(server: PostgresServer, admin, archive: SqlDump,
             expected: dict[str, Any], database: str, *, name: str, no_owner: bool, jobs: int,
             timeout_s: float, apply: bool, log: Log
             ) -> tuple[Comparison, DatabaseFingerprint]:
    """``database`` against the archive and the manifest. The object list (``pg_dump
    --schema-only``), the catalog-only entries (sequence values, large objects) and the row
    counts run in parallel; then, with ``apply``, the archive's database properties are applied
    (after counting, so a database-level ``statement_timeout`` cannot cut the counts short) and
    compared. ``name`` is the database's name in the differences (the target of a restore)."""
    props = database_properties(archive)
    owner = server.user if no_owner else None

    def objects() -> Comparison:
        restored = dump_schema(server, database, timeout_s=timeout_s)
        found = Comparison()
        compare_objects(archive, restored, found, expected_owner=owner,
                        definitions_why_not=definitions_comparable(archive, restored))
        return found

    def catalog() -> Comparison:
        conn = server.connect(database)
        try:
            conn.set_session(readonly=True, autocommit=True)
            found = Comparison()
            compare_catalog_entries(archive, conn, found, expected_owner=owner)
            return found
        finally:
            conn.close()

    comparison = Comparison()
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="pg-compare") as pool:
        rows = pool.submit(fingerprint_database, server, database, jobs=jobs)
        parts = [pool.submit(objects), pool.submit(catalog)]
        restored = rows.result()
        for part in parts:
            comparison.merge(part.result())
    compare_rows(expected, restored.tables, restored.large_objects, comparison)
    if apply and props is not None:
        apply_database_properties(admin, props, database, apply_owner=not no_owner,
                                  log=log)
    compare_database_properties(
        props, expected, read_database_state(admin, database), comparison,
        database=name, expected_owner=owner)
    return comparison, restored


def compare_database(repo: BackupRepository, record: BackupRecord, server: PostgresServer,
                     source_database: str, database: str, *, no_owner: bool = False,
                     jobs: int = 2, workdir: str | None = None, timeout_s: float = 3600,
                     log: Log = _quiet) -> Comparison:
    """Compare an existing ``database`` on ``server`` with ``source_database`` of a backup, as a
    restore does: the archive's object list, sequence values, large objects, row counts and
    database properties. Changes nothing. ``no_owner``: expect everything owned by the
    connecting user (a restore made with ``no_owner``)."""
    expected = _expected(record, source_database)
    admin = server.connect("postgres")
    admin.autocommit = True
    try:
        if not _database_exists(admin, database):
            raise InvalidRequest(f"{server.describe()} has no database {database!r}")
        with tempfile.TemporaryDirectory(prefix="rag-backup-pg-", dir=workdir) as tmp:
            archive = _unpack(repo, record, source_database, tmp, log)
            contents = read_archive(server.tool("pg_restore"), str(archive), tmp,
                                    timeout_s=timeout_s)
            comparison, _ = _compare(server, admin, contents, expected, database,
                                     name=database, no_owner=no_owner, jobs=jobs,
                                     timeout_s=timeout_s, apply=False, log=log)
        return comparison
    except psycopg2.Error as exc:
        raise StoreUnreachable(f"comparing {database!r} on {server.describe()} failed: "
                               f"{tail(str(exc))}") from exc
    finally:
        admin.close()
