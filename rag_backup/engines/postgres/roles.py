"""Roles of a PostgreSQL backup (``globals.sql.zst``, ``pg_dumpall --globals-only``) onto a server.

The globals file is parsed, not replayed: ``CREATE ROLE``, ``ALTER ROLE ... WITH <attributes>``,
``ALTER ROLE ... SET``, ``GRANT role TO role``, ``COMMENT ON ROLE`` are read into
:class:`RoleSpec` records and rebuilt with quoted identifiers and literals. Tablespaces are
reported, never created (their directories belong to another machine). Roles the target lacks
are created with their attributes, settings and memberships; password hashes only when the backup
has them. An existing role is left alone unless ``update_existing`` is set, and never the
connecting user or the bootstrap superuser.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from psycopg2 import sql

from rag_backup.engines.postgres.common import GLOBALS_ARTIFACT, Log
from rag_backup.engines.postgres.sqltext import (
    Cursor,
    Unparsed,
    statement_text,
    statements,
)
from rag_backup.engines.zstream import decompress_artifact
from rag_backup.errors import IntegrityError, RagBackupError
from rag_backup.repository import BackupRecord, BackupRepository

ATTRIBUTES = {"SUPERUSER", "NOSUPERUSER", "INHERIT", "NOINHERIT", "CREATEROLE", "NOCREATEROLE",
              "CREATEDB", "NOCREATEDB", "LOGIN", "NOLOGIN", "REPLICATION", "NOREPLICATION",
              "BYPASSRLS", "NOBYPASSRLS"}


@dataclass
class RoleSpec:
    name: str
    attributes: list[str] = field(default_factory=list)
    password: str | None = field(default=None, repr=False)  # a hash (SCRAM/md5), never plain
    valid_until: str | None = None
    connection_limit: int | None = None
    settings: dict[str, list[str]] = field(default_factory=dict)
    comment: str | None = None


@dataclass(frozen=True)
class Membership:
    role: str  # the role granted
    member: str
    admin_option: bool = False


@dataclass
class Globals:
    roles: dict[str, RoleSpec] = field(default_factory=dict)
    memberships: list[Membership] = field(default_factory=list)
    tablespaces: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)


@dataclass
class RolesOutcome:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)  # left alone
    memberships_granted: int = 0
    tablespaces_not_created: list[str] = field(default_factory=list)
    without_password: list[str] = field(default_factory=list)


def _role(globals_: Globals, name: str) -> RoleSpec:
    return globals_.roles.setdefault(name, RoleSpec(name))


def _parse_alter_role(c: Cursor, globals_: Globals) -> None:
    spec = _role(globals_, c.name())
    if c.accept("SET"):
        name = c.name()
        spec.settings[name] = c.values()
        return
    if c.accept("IN", "DATABASE"):
        raise Unparsed("role-in-database settings belong to the database's archive")
    c.accept("WITH")
    while not c.at_end():
        if c.accept("PASSWORD"):
            spec.password = None if c.accept("NULL") else c.string()
        elif c.accept("VALID", "UNTIL"):
            spec.valid_until = c.string()
        elif c.accept("CONNECTION", "LIMIT"):
            spec.connection_limit = int(c.take().text)
        else:
            word = c.take()
            if word.kind != "word" or word.text.upper() not in ATTRIBUTES:
                raise Unparsed(f"unknown role attribute {word.text!r}")
            spec.attributes.append(word.text.upper())


def _parse_grant(c: Cursor, globals_: Globals) -> None:
    roles = [c.name()]
    while c.accept_op(","):
        roles.append(c.name())
    c.expect("TO")
    members = [c.name()]
    while c.accept_op(","):
        members.append(c.name())
    admin = False
    if c.accept("WITH"):  # WITH ADMIN OPTION (<= 15) or WITH ADMIN TRUE, INHERIT ..., SET ...
        while True:
            option = c.take().text.upper()
            value = c.take().text.upper()
            if option == "ADMIN" and value in ("OPTION", "TRUE"):
                admin = True
            if not c.accept_op(","):
                break
    if c.accept("GRANTED", "BY"):
        c.name()
    c.end()
    globals_.memberships.extend(Membership(r, m, admin) for r in roles for m in members)


def parse_globals(text: str) -> Globals:
    """The roles, memberships and tablespaces of ``pg_dumpall --globals-only`` output."""
    out = Globals()
    for tokens in statements(text):
        c = Cursor(tokens)
        try:
            if c.accept("CREATE", "ROLE"):
                _role(out, c.name())
                c.end()
            elif c.accept("ALTER", "ROLE"):
                _parse_alter_role(c, out)
            elif c.accept("GRANT"):
                _parse_grant(c, out)
            elif c.accept("COMMENT", "ON", "ROLE"):
                spec = _role(out, c.name())
                c.expect("IS")
                spec.comment = None if c.accept("NULL") else c.string()
            elif c.accept("CREATE", "TABLESPACE"):
                out.tablespaces.append(c.name())
            elif c.accept("SET") or c.accept("RESET") or c.accept("SELECT"):
                continue
            else:
                raise Unparsed("not a role statement")
        except (Unparsed, ValueError) as exc:
            out.unsupported.append(f"{statement_text(tokens)} ({exc})")
    return out


def read_globals(repo: BackupRepository, record: BackupRecord) -> Globals:
    """The backup's globals artifact, checked (sha256, zstd) and parsed."""
    artifact = next((a for a in record.manifest.artifacts if a.path == GLOBALS_ARTIFACT), None)
    if artifact is None:
        raise IntegrityError(f"postgres backup {record.partition_key} has no {GLOBALS_ARTIFACT}:"
                             " its roles cannot be restored; create them by hand or restore "
                             "without restore_roles")
    with tempfile.TemporaryFile() as out:
        decompress_artifact(repo, record, artifact, out=out)
        out.seek(0)
        return parse_globals(out.read().decode("utf-8", errors="replace"))


def _role_options(spec: RoleSpec, with_password: bool) -> sql.Composable:
    parts: list[sql.Composable] = [sql.SQL(a) for a in spec.attributes if a in ATTRIBUTES]
    if spec.connection_limit is not None:
        parts.append(sql.SQL("CONNECTION LIMIT {}").format(sql.Literal(spec.connection_limit)))
    if spec.valid_until is not None:
        parts.append(sql.SQL("VALID UNTIL {}").format(sql.Literal(spec.valid_until)))
    if with_password and spec.password is not None:
        parts.append(sql.SQL("PASSWORD {}").format(sql.Literal(spec.password)))
    return sql.SQL(" ").join(parts)


def restore_roles(admin, globals_: Globals, *, connecting_user: str, with_passwords: bool,
                  update_existing: bool = False, log: Log = lambda _: None) -> RolesOutcome:
    """Create the roles of ``globals_`` that the server behind ``admin`` (autocommit) lacks, with
    their attributes, settings, comments and memberships; with ``update_existing`` also bring
    existing roles' attributes, settings and memberships in line (never the connecting user's or
    the bootstrap superuser's). Raises a ``RagBackupError`` naming the role that failed."""
    outcome = RolesOutcome(tablespaces_not_created=list(globals_.tablespaces))
    with admin.cursor() as cur:
        cur.execute("SELECT rolname FROM pg_roles")
        present = {r[0] for r in cur.fetchall()}
        cur.execute("SELECT rolname FROM pg_roles WHERE oid = 10")
        protected = {cur.fetchone()[0], connecting_user}
        cur.execute("SELECT r.rolname, m.rolname FROM pg_auth_members a JOIN pg_roles r "
                    "ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member")
        members = set(cur.fetchall())
    touched: set[str] = set()
    for name, spec in globals_.roles.items():
        if name.startswith("pg_"):
            continue
        if name in present and (name in protected or not update_existing):
            outcome.existing.append(name)
            continue
        verb = "ALTER" if name in present else "CREATE"
        statement = sql.SQL(verb + " ROLE {} WITH {}").format(
            sql.Identifier(name), _role_options(spec, with_passwords))
        _execute(admin, statement, f"{verb.lower()} role {name!r}")
        for setting, values in spec.settings.items():
            _execute(admin, sql.SQL("ALTER ROLE {} SET {} TO {}").format(
                sql.Identifier(name), sql.Identifier(setting),
                sql.SQL(", ").join(sql.Literal(v) for v in values)),
                f"setting {setting} of role {name!r}")
        if spec.comment is not None:
            _execute(admin, sql.SQL("COMMENT ON ROLE {} IS {}").format(
                sql.Identifier(name), sql.Literal(spec.comment)), f"comment of role {name!r}")
        (outcome.updated if name in present else outcome.created).append(name)
        if spec.password is None or not with_passwords:
            if "LOGIN" in spec.attributes and name not in present:
                outcome.without_password.append(name)
        touched.add(name)
        present.add(name)
    for m in globals_.memberships:
        # only members this call created or updated: an existing role gains no membership
        if (m.role, m.member) in members or m.member not in touched \
                or m.role not in present:
            continue
        _execute(admin, sql.SQL("GRANT {} TO {}{}").format(
            sql.Identifier(m.role), sql.Identifier(m.member),
            sql.SQL(" WITH ADMIN OPTION" if m.admin_option else "")),
            f"membership of {m.member!r} in {m.role!r}")
        outcome.memberships_granted += 1
    if outcome.created or outcome.updated:
        log(f"roles created: {outcome.created or 'none'}; updated: {outcome.updated or 'none'}; "
            f"memberships granted: {outcome.memberships_granted}")
    if outcome.without_password:
        log(f"login roles created without a password (the backup holds none): "
            f"{outcome.without_password}; set them with ALTER ROLE ... PASSWORD")
    if outcome.tablespaces_not_created:
        log(f"tablespaces in the backup, not created (create them on this server by hand if "
            f"needed): {outcome.tablespaces_not_created}")
    for statement in globals_.unsupported:
        log(f"globals statement not applied: {statement}")
    return outcome


def _execute(admin, statement: sql.Composable, what: str) -> None:
    try:
        with admin.cursor() as cur:
            cur.execute(statement)
    except Exception as exc:  # psycopg2.Error; the statement (password hash) is never shown
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RagBackupError(f"restoring roles: {what} failed: {text}; create it by hand or "
                             "restore without restore_roles (with no_owner)") from exc
