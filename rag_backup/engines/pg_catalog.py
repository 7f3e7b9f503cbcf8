"""What a PostgreSQL archive holds, read back from its own SQL, and the restored catalog against it.

A custom-format archive (``pg_dump -Fc``) keeps the whole-database properties as TOC entries
(``DATABASE``, ``DATABASE PROPERTIES``, ``COMMENT``/``ACL`` on ``DATABASE``) that ``pg_restore``
prints only with ``--create``. This module:

- asks ``pg_restore --create`` for the SQL of every entry except table data and large-object
  contents, and splits it into entries by the ``-- Name: ...; Type: ...`` header pg_dump writes
  for each (:func:`read_archive`);
- parses the database-level statements into a structured :class:`DatabaseProperties` with a
  small tokenizer: only known statement shapes are accepted, and statements are rebuilt with
  quoted identifiers and literals for the staging database (:func:`apply_database_properties`),
  never replayed as text;
- compares, field by field, into a :class:`Comparison`: every schema entry of the archive with a
  ``pg_dump --schema-only`` of the restored database (existence, owner, definition), sequence
  values, large objects, populated materialized views (catalog queries), and the database's
  comment, settings, role-in-database settings, ACL, owner, encoding and collation
  (shared catalogs).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psycopg2 import sql

from rag_backup.engines.comparison import Comparison
from rag_backup.errors import ToolError
from rag_backup.proc import StreamingProcess, run

if TYPE_CHECKING:  # the engine module imports this one
    from rag_backup.engines.postgres import PostgresServer

Log = Callable[[str], None]

# -- SQL text as pg_dump writes it ---------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>--[^\n]*)
  | (?P<qident>"(?:[^"]|"")*")
  | (?P<estring>[Ee]'(?:[^'\\]|\\.|'')*')
  | (?P<string>'(?:[^']|'')*')
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<op>.)
""", re.X | re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "\\": "\\", "'": "'"}


class Unparsed(ValueError):
    """A statement of a shape this parser does not accept."""


@dataclass(frozen=True)
class Token:
    kind: str  # word | ident (double-quoted) | string | num | op
    text: str  # identifier or string value (unquoted), or the raw text

    def kw(self, *words: str) -> bool:
        return self.kind == "word" and self.text.upper() in words

    def op(self, char: str) -> bool:
        return self.kind == "op" and self.text == char


def tokenize(text: str) -> list[Token]:
    """SQL tokens; whitespace and ``--`` comments dropped; psql meta-command lines skipped."""
    text = "\n".join(line for line in text.splitlines() if not line.startswith("\\"))
    out: list[Token] = []
    for m in _TOKEN.finditer(text):
        kind, raw = m.lastgroup, m.group()
        if kind in ("ws", "comment"):
            continue
        if kind == "qident":
            out.append(Token("ident", raw[1:-1].replace('""', '"')))
        elif kind == "string":
            out.append(Token("string", raw[1:-1].replace("''", "'")))
        elif kind == "estring":
            body = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e.group(1), e.group(1)), raw[2:-1])
            out.append(Token("string", body.replace("''", "'")))
        else:
            out.append(Token(kind or "op", raw))
    return out


def statements(text: str) -> Iterator[list[Token]]:
    """Statements of ``text``, split at top-level semicolons."""
    current: list[Token] = []
    for tok in tokenize(text):
        if tok.op(";"):
            if current:
                yield current
            current = []
        else:
            current.append(tok)
    if current:
        yield current


class Cursor:
    """Walks one statement's tokens; every mismatch raises :class:`Unparsed`."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens, self.i = tokens, 0

    def peek(self, ahead: int = 0) -> Token | None:
        j = self.i + ahead
        return self.tokens[j] if j < len(self.tokens) else None

    def at_end(self) -> bool:
        return self.i >= len(self.tokens)

    def accept(self, *words: str) -> bool:
        """Consume the keyword sequence ``words`` if it comes next."""
        for k, word in enumerate(words):
            tok = self.peek(k)
            if tok is None or not tok.kw(word):
                return False
        self.i += len(words)
        return True

    def expect(self, *words: str) -> None:
        if not self.accept(*words):
            raise Unparsed(f"expected {' '.join(words)}")

    def accept_op(self, char: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.op(char):
            self.i += 1
            return True
        return False

    def take(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise Unparsed("unexpected end")
        self.i += 1
        return tok

    def name(self) -> str:
        """An identifier: quoted as written, unquoted folded to lower case."""
        tok = self.take()
        if tok.kind == "ident":
            return tok.text
        if tok.kind == "word":
            return tok.text.lower()
        raise Unparsed(f"expected a name, got {tok.text!r}")

    def string(self) -> str:
        tok = self.take()
        if tok.kind != "string":
            raise Unparsed(f"expected a string, got {tok.text!r}")
        return tok.text

    def values(self) -> list[str]:
        """``TO`` / ``=`` values of a ``SET``: literals (or bare words and numbers) by commas."""
        if not (self.accept("TO") or self.accept_op("=")):
            raise Unparsed("expected TO")
        out = []
        while True:
            tok = self.take()
            if tok.kind not in ("string", "num", "word", "ident"):
                raise Unparsed(f"unexpected value {tok.text!r}")
            out.append(tok.text)
            if not self.accept_op(","):
                break
        self.end()
        return out

    def end(self) -> None:
        if not self.at_end():
            raise Unparsed(f"unexpected {self.peek().text!r}")  # type: ignore[union-attr]


def statement_text(tokens: list[Token], limit: int = 120) -> str:
    """A statement's tokens for a message, strings elided (they may hold password hashes)."""
    text = " ".join("'...'" if t.kind == "string" else
                    f'"{t.text}"' if t.kind == "ident" else t.text for t in tokens)
    return text if len(text) <= limit else text[:limit] + "..."


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
