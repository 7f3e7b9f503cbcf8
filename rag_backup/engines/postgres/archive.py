"""What a PostgreSQL archive holds, read back from its own SQL.

A custom-format archive (``pg_dump -Fc``) keeps the whole-database properties as TOC entries
(``DATABASE``, ``DATABASE PROPERTIES``, ``COMMENT``/``ACL`` on ``DATABASE``) that ``pg_restore``
prints only with ``--create``. This module:

- asks ``pg_restore --create`` for the SQL of every entry except table data and large-object
  contents, and splits it into entries by the ``-- Name: ...; Type: ...`` header pg_dump writes
  for each (:func:`read_archive`);
- parses the database-level statements into a structured :class:`DatabaseProperties` with a
  small tokenizer (``sqltext``): only known statement shapes are accepted, and statements are
  rebuilt with quoted identifiers and literals for the staging database
  (:func:`apply_database_properties`), never replayed as text.

The comparison of a restored database with what is read here is ``compare``'s.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg2 import sql

from rag_backup import progress
from rag_backup.engines.postgres.common import DUMP_SUFFIX, Log
from rag_backup.engines.postgres.server import PostgresServer
from rag_backup.engines.postgres.sqltext import (
    Cursor,
    Token,
    Unparsed,
    statement_text,
    statements,
)
from rag_backup.engines.postgres.toc import BlockMarks, set_data_offsets
from rag_backup.engines.zstream import decompress_artifact
from rag_backup.proc import StreamingProcess, run
from rag_backup.repository import BackupRecord, BackupRepository

# -- the archive's entries -------------------------------------------------------------------

_HEADER = re.compile(r"^-- (?:Data for )?Name: (?P<name>.*); Type: (?P<type>[A-Z ]+); "
                     r"Schema: (?P<schema>.*); Owner: (?P<owner>.*)$")
_VERSION = re.compile(r"^-- Dumped (?P<what>from database|by pg_dump) version (?P<v>\d+)")
_OWNER_LINE = re.compile(r"^ALTER [A-Z ]+ .* OWNER TO .*;$")


@dataclass
class Entry:
    """One TOC entry as pg_dump prints it: header fields and its SQL (owner lines apart)."""

    type: str
    schema: str
    name: str
    owner: str
    lines: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.type, self.schema, self.name

    @property
    def sql(self) -> str:
        return "\n".join(self.lines)

    def definition(self) -> str:
        """The statements that define the object, without session settings, psql commands,
        comments and ``OWNER TO`` (the owner is compared on its own)."""
        kept = [line.rstrip() for line in self.lines
                if line.strip() and not line.startswith(("--", "\\", "SET ",
                                                         "SELECT pg_catalog.set_config("))
                and not _OWNER_LINE.match(line)]
        return "\n".join(kept)

    def label(self) -> str:
        if self.type in ("COMMENT", "ACL", "SECURITY LABEL"):
            return f"{self.type} ON {self.name}" + (
                f" (schema {self.schema})" if self.schema != "-" else "")
        return f"{self.type} {self.name}" if self.schema == "-" else \
            f"{self.type} {self.schema}.{self.name}"


@dataclass
class SqlDump:
    """The entries of one ``pg_restore -f -`` or ``pg_dump`` SQL output."""

    entries: list[Entry]
    dumped_from_major: int | None = None
    dumped_by_major: int | None = None


def parse_sql_dump(lines: Iterable[str]) -> SqlDump:
    """Split SQL text into entries at pg_dump's ``-- Name: ...`` headers."""
    dump = SqlDump([])
    current: Entry | None = None
    for raw in lines:
        line = raw.rstrip("\n")
        header = _HEADER.match(line)
        if header:
            current = Entry(header["type"], header["schema"], header["name"], header["owner"])
            dump.entries.append(current)
            continue
        version = _VERSION.match(line)
        if version and current is None:
            if version["what"] == "by pg_dump":
                dump.dumped_by_major = int(version["v"])
            else:
                dump.dumped_from_major = int(version["v"])
        if current is not None:
            current.lines.append(line)
    return dump


DATA_ENTRIES = ("TABLE DATA", "BLOBS")
_LIST_LINE = re.compile(r"^\d+; \d+ \d+ (?P<rest>.*)$")


def _stream_lines(argv: list[str], what: str, timeout: float, env: dict[str, str]
                  ) -> SqlDump:
    proc = StreamingProcess(argv, what=what, timeout=timeout, env=env)
    try:
        assert proc.proc.stdout is not None
        dump = parse_sql_dump(line.decode("utf-8", errors="replace")
                              for line in proc.proc.stdout)
        proc.wait()
    except BaseException:
        proc.abort()
        raise
    return dump


def read_archive(pg_restore: str, archive: str, workdir: str, *, timeout_s: float) -> SqlDump:
    """The SQL of every entry of a custom-format archive except table data and large-object
    contents, database-level entries included (``--create``)."""
    listing = run([pg_restore, "--create", "--list", archive],
                  what=f"pg_restore --list of {archive}", timeout=timeout_s).stdout.decode(
        "utf-8", errors="replace")
    selected = [line for line in listing.splitlines()
                if not ((m := _LIST_LINE.match(line))
                        and m["rest"].startswith(tuple(f"{d} " for d in DATA_ENTRIES)))]
    list_path = f"{workdir}/schema.list"
    with open(list_path, "w", encoding="utf-8") as out:
        out.write("\n".join(selected) + "\n")
    return _stream_lines([pg_restore, "--create", f"--use-list={list_path}", "--file=-",
                          archive], f"pg_restore --create --file=- of {archive}", timeout_s, {})


def dump_schema(server: PostgresServer, database: str, *, timeout_s: float) -> SqlDump:
    """``pg_dump --schema-only`` of ``database``: the restored catalog as pg_dump reads it."""
    return _stream_lines(
        [server.tool("pg_dump"), "--schema-only", "--no-password",
         f"--dbname={server.dsn(database)}"],
        f"pg_dump --schema-only of {database!r} on {server.describe()}", timeout_s, server.env())


def _unpack(repo: BackupRepository, record: BackupRecord, source_database: str, tmp: str,
            log: Log) -> Path:
    """The database's archive, checked (sha256, zstd) and decompressed into ``tmp``, with the
    data offsets pg_dump could not write through a pipe put in (``toc``), so that the workers of
    ``pg_restore --jobs`` seek to their tables instead of reading up to them."""
    artifact = next(a for a in record.manifest.artifacts
                    if a.path == f"{source_database}{DUMP_SUFFIX}")
    archive = Path(tmp) / "archive.dump"
    with open(archive, "wb") as out, \
            progress.tracking(f"unpacking postgres archive {artifact.path}", artifact.size):
        marks = BlockMarks(out)
        decompress_artifact(repo, record, artifact, out=marks)
    log(f"archive {artifact.path} checked and unpacked: {archive.stat().st_size} bytes; "
        f"{set_data_offsets(archive, marks)}")
    return archive


# -- database-level properties ---------------------------------------------------------------

DB_PRIVILEGES = ("CREATE", "CONNECT", "TEMPORARY")
_PRIVILEGE_WORDS = {"CREATE": ("CREATE",), "CONNECT": ("CONNECT",), "TEMPORARY": ("TEMPORARY",),
                    "TEMP": ("TEMPORARY",), "ALL": DB_PRIVILEGES}
_CREATE_OPTIONS = ("ENCODING", "LOCALE", "LC_COLLATE", "LC_CTYPE", "LOCALE_PROVIDER",
                   "ICU_LOCALE", "ICU_RULES", "BUILTIN_LOCALE", "COLLATION_VERSION",
                   "TEMPLATE", "TABLESPACE", "OWNER", "OID", "STRATEGY")
PUBLIC = "PUBLIC"
OWNER_MARK = "(owner)"


@dataclass(frozen=True)
class Grant:
    """One ``GRANT``/``REVOKE ... ON DATABASE`` statement."""

    revoke: bool
    privileges: tuple[str, ...]
    grantees: tuple[str, ...]  # role names, or PUBLIC
    grant_option: bool  # GRANT ... WITH GRANT OPTION / REVOKE GRANT OPTION FOR ...


@dataclass
class DatabaseProperties:
    """The whole-database properties an archive holds, parsed from its database entries."""

    name: str
    owner: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # CREATE DATABASE ... WITH
    comment: str | None = None
    settings: dict[str, str] = field(default_factory=dict)  # name -> value as pg_db_role_setting
    role_settings: dict[str, dict[str, str]] = field(default_factory=dict)
    grants: list[Grant] = field(default_factory=list)
    connection_limit: int | None = None
    unsupported: list[str] = field(default_factory=list)  # statements not applied

    def encoding(self) -> str | None:
        return self.options.get("ENCODING")

    def lc_collate(self) -> str | None:
        return self.options.get("LC_COLLATE", self.options.get("LOCALE"))

    def lc_ctype(self) -> str | None:
        return self.options.get("LC_CTYPE", self.options.get("LOCALE"))

    def expected_acl(self, owner: str) -> dict[str, set[str]]:
        """Privileges per grantee once every grant ran from PostgreSQL's default database ACL
        (owner: CREATE, CONNECT, TEMPORARY; PUBLIC: CONNECT, TEMPORARY), which is what pg_dump
        writes its grants relative to. The owner is named :data:`OWNER_MARK`; a grantable
        privilege ends in ``*``."""
        held: dict[tuple[str, str], bool] = {(OWNER_MARK, p): False for p in DB_PRIVILEGES}
        held.update({(PUBLIC, "CONNECT"): False, (PUBLIC, "TEMPORARY"): False})
        for grant in self.grants:
            for grantee in grant.grantees:
                who = OWNER_MARK if grantee == owner else grantee
                for priv in grant.privileges:
                    if grant.revoke and grant.grant_option:
                        if (who, priv) in held:
                            held[(who, priv)] = False
                    elif grant.revoke:
                        held.pop((who, priv), None)
                    else:
                        held[(who, priv)] = held.get((who, priv), False) or grant.grant_option
        return _acl_by_grantee(held)


def _acl_by_grantee(held: dict[tuple[str, str], bool]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for (who, priv), grantable in held.items():
        out[who].add(priv + ("*" if grantable else ""))
    return dict(out)


def _privileges(c: Cursor) -> tuple[str, ...]:
    privs: list[str] = []
    while True:
        word = c.take()
        if word.kind != "word" or word.text.upper() not in _PRIVILEGE_WORDS:
            raise Unparsed(f"unknown database privilege {word.text!r}")
        privs.extend(_PRIVILEGE_WORDS[word.text.upper()])
        c.accept("PRIVILEGES")
        if not c.accept_op(","):
            return tuple(dict.fromkeys(privs))


def _grantees(c: Cursor) -> tuple[str, ...]:
    out = []
    while True:
        out.append(PUBLIC if c.accept("PUBLIC") else c.name())
        if not c.accept_op(","):
            return tuple(out)


def _parse_database_statement(tokens: list[Token], props: DatabaseProperties) -> None:
    c, db = Cursor(tokens), props.name

    def this_database() -> None:
        if c.name() != db:
            raise Unparsed("names another database")

    if c.accept("CREATE", "DATABASE"):
        this_database()
        c.accept("WITH")
        while not c.at_end():
            key = c.take()
            if key.kind != "word" or key.text.upper() not in _CREATE_OPTIONS:
                raise Unparsed(f"unknown CREATE DATABASE option {key.text!r}")
            c.accept_op("=")
            props.options[key.text.upper()] = c.take().text
    elif c.accept("ALTER", "DATABASE"):
        this_database()
        if c.accept("OWNER", "TO"):
            props.owner = c.name()
            c.end()
        elif c.accept("SET"):
            name = c.name()
            props.settings[name] = ", ".join(c.values())
        elif c.accept("CONNECTION", "LIMIT"):
            c.accept_op("=")
            props.connection_limit = int(c.take().text)
            c.end()
        else:
            raise Unparsed("unknown ALTER DATABASE form")
    elif c.accept("COMMENT", "ON", "DATABASE"):
        this_database()
        c.expect("IS")
        props.comment = None if c.accept("NULL") else c.string()
        c.end()
    elif c.accept("ALTER", "ROLE"):
        role = c.name()
        c.expect("IN", "DATABASE")
        this_database()
        c.expect("SET")
        name = c.name()
        props.role_settings.setdefault(role, {})[name] = ", ".join(c.values())
    elif c.accept("GRANT"):
        privs = _privileges(c)
        c.expect("ON", "DATABASE")
        this_database()
        c.expect("TO")
        grantees = _grantees(c)
        option = c.accept("WITH", "GRANT", "OPTION")
        if c.accept("GRANTED", "BY"):
            c.name()
        c.end()
        props.grants.append(Grant(False, privs, grantees, option))
    elif c.accept("REVOKE"):
        option = c.accept("GRANT", "OPTION", "FOR")
        privs = _privileges(c)
        c.expect("ON", "DATABASE")
        this_database()
        c.expect("FROM")
        grantees = _grantees(c)
        c.accept("CASCADE")
        c.end()
        props.grants.append(Grant(True, privs, grantees, option))
    elif c.accept("SET") or c.accept("RESET") or c.accept("SELECT", "PG_CATALOG"):
        return  # session settings (search_path, SET SESSION AUTHORIZATION for a grantor)
    else:
        raise Unparsed("not a database statement")


def _is_database_entry(entry: Entry) -> bool:
    return entry.type in ("DATABASE", "DATABASE PROPERTIES") or (
        entry.type in ("COMMENT", "ACL", "SECURITY LABEL") and entry.schema == "-"
        and entry.name.startswith("DATABASE "))


def database_properties(dump: SqlDump) -> DatabaseProperties | None:
    """The database-level entries of an archive, parsed; None if the archive has none."""
    db_entries = [e for e in dump.entries if _is_database_entry(e)]
    main = next((e for e in db_entries if e.type == "DATABASE"), None)
    if main is None:
        return None
    props = DatabaseProperties(main.name, owner=main.owner or None)
    for entry in db_entries:
        if entry.type == "SECURITY LABEL":
            props.unsupported.append(f"SECURITY LABEL ON {entry.name}")
            continue
        for tokens in statements(entry.sql):
            try:
                _parse_database_statement(tokens, props)
            except (Unparsed, ValueError) as exc:
                props.unsupported.append(f"{statement_text(tokens)} ({exc})")
    return props


def create_database_sql(name: str, props: DatabaseProperties | None,
                        fallback: dict[str, Any]) -> sql.Composed:
    """``CREATE DATABASE`` for the staging copy: encoding and locale from the archive's own
    ``CREATE DATABASE`` (``fallback``, the manifest's fingerprint, for what it lacks)."""
    opts = props.options if props else {}
    parts = [sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} "
                     "LC_CTYPE {}").format(
        sql.Identifier(name), sql.Literal(opts.get("ENCODING", fallback["encoding"])),
        sql.Literal((props and props.lc_collate()) or fallback["lc_collate"]),
        sql.Literal((props and props.lc_ctype()) or fallback["lc_ctype"]))]
    provider = opts.get("LOCALE_PROVIDER", "libc").lower()
    if provider in ("icu", "builtin"):
        parts.append(sql.SQL(" LOCALE_PROVIDER {}").format(sql.SQL(provider)))
        if provider == "icu" and "ICU_LOCALE" in opts:
            parts.append(sql.SQL(" ICU_LOCALE {}").format(sql.Literal(opts["ICU_LOCALE"])))
        if "ICU_RULES" in opts:
            parts.append(sql.SQL(" ICU_RULES {}").format(sql.Literal(opts["ICU_RULES"])))
        if "BUILTIN_LOCALE" in opts:
            parts.append(sql.SQL(" BUILTIN_LOCALE {}").format(
                sql.Literal(opts["BUILTIN_LOCALE"])))
    return sql.Composed(parts)


def _values_sql(value: str, list_valued: bool) -> sql.Composable:
    items = value.split(", ") if list_valued else [value]
    return sql.SQL(", ").join(sql.Literal(v) for v in items)


def database_statements(props: DatabaseProperties, target: str, *, apply_owner: bool
                        ) -> list[tuple[str, sql.Composed]]:
    """The archive's database properties as statements for ``target``: rebuilt from the parsed
    values (identifiers quoted, values as literals), so only the database name changes."""
    db = sql.Identifier(target)
    out: list[tuple[str, sql.Composed]] = []
    if apply_owner and props.owner:
        out.append(("owner", sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            db, sql.Identifier(props.owner))))
    if props.comment is not None:
        out.append(("comment", sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            db, sql.Literal(props.comment))))
    if props.connection_limit is not None:
        out.append(("connection limit", sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
            db, sql.Literal(props.connection_limit))))
    for name, value in props.settings.items():
        out.append((f"setting {name}", sql.SQL("ALTER DATABASE {} SET {} TO {}").format(
            db, sql.Identifier(name), _values_sql(value, name.lower() in LIST_SETTINGS))))
    for role, settings in props.role_settings.items():
        for name, value in settings.items():
            out.append((f"role {role} setting {name}",
                        sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} TO {}").format(
                            sql.Identifier(role), db, sql.Identifier(name),
                            _values_sql(value, name.lower() in LIST_SETTINGS))))
    for grant in props.grants:
        privs = sql.SQL(", ").join(sql.SQL(p) for p in grant.privileges)  # from a fixed list
        who = sql.SQL(", ").join(sql.SQL(PUBLIC) if g == PUBLIC else sql.Identifier(g)
                                 for g in grant.grantees)
        if grant.revoke:
            text = sql.SQL("REVOKE {}{} ON DATABASE {} FROM {}").format(
                sql.SQL("GRANT OPTION FOR " if grant.grant_option else ""), privs, db, who)
        else:
            text = sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                privs, db, who, sql.SQL(" WITH GRANT OPTION" if grant.grant_option else ""))
        out.append((f"privileges of {', '.join(grant.grantees)}", text))
    return out


# pg_dump writes list-valued settings (GUC_LIST_QUOTE) one literal per element
LIST_SETTINGS = {"search_path", "session_preload_libraries", "shared_preload_libraries",
                 "local_preload_libraries", "temp_tablespaces", "unix_socket_directories"}


def apply_database_properties(admin, props: DatabaseProperties, target: str, *,
                              apply_owner: bool, log: Log) -> list[str]:
    """Apply the archive's database properties to ``target``; every statement on its own, so
    one that cannot apply (a role missing on this server) does not stop the others. Returns
    what failed; the comparison that follows names the resulting differences."""
    failed = []
    for what, statement in database_statements(props, target, apply_owner=apply_owner):
        try:
            with admin.cursor() as cur:
                cur.execute(statement)
        except Exception as exc:  # psycopg2.Error: reported, then compared
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            failed.append(f"{what}: {first}")
            log(f"database {target!r}: could not apply {what}: {first}")
    return failed
