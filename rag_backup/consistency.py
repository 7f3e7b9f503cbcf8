"""Consistency across stores, checked on restored data: declarative rules.

A rule states how the data of one store refers to the data of another, with every name given
as it is in production (the SOURCE database, collection and bucket names):

- ``milvus_ids_in_column``: the column holds the primary key of every entity of the Milvus
  collections matching ``collections`` (glob patterns): no vector without its row.
- ``column_values_are_objects``: every non-null value of the column is the key of an object in
  ``bucket``, or, without ``bucket``, a ``<bucket>/<key>`` of an object in the backed-up
  buckets: no row pointing at a missing file.

Columns are written ``<database>.<schema>.<table>.<column>``. The rules come from the YAML or
JSON file named by ``RAG_DRILL_RULES_FILE``; unset, the RAG service's own rules apply
(``DEFAULT_RULES``). A drill evaluates them on what it restored (``RestoredData`` maps each
source name to its scratch copy). Nothing is held whole in memory: the Milvus ids and the
object keys are streamed in batches (COPY) into a temporary table of the restored PostgreSQL
database and anti-joined there.

A rule whose database, table, column, collection or bucket is absent from the restored data,
or whose store was not restored, is NOT RUN (with the reason), never passed. Plain Python: no
Dagster import.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from psycopg2 import sql
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, \
    model_validator

from rag_backup.engines import milvus as milvus_engine
from rag_backup.engines import minio as minio_engine
from rag_backup.engines.milvus import MilvusServer
from rag_backup.engines.minio import S3Endpoint
from rag_backup.engines.postgres import PostgresServer
from rag_backup.errors import InvalidRequest

RULES_ENV = "RAG_DRILL_RULES_FILE"
COPY_BATCH = 10_000  # values per COPY into the temporary table
EXAMPLES = 5  # violations named per rule

PASSED, FAILED, NOT_RUN = "passed", "failed", "not run"

DEFAULT_RULES = """\
# The RAG service's data model (used when RAG_DRILL_RULES_FILE is unset).
rules:
  - name: vectors_have_documents
    check: milvus_ids_in_column
    collections: ["ministry_*"]
    column: ragqa.public.documents.id
  - name: document_objects_exist
    check: column_values_are_objects
    column: ragqa.public.documents.object_key   # values are "<bucket>/<key>"
  - name: document_images_exist
    check: column_values_are_objects
    column: ragqa.public.documents.image_key
"""


# -- the rules -----------------------------------------------------------------------------

class ColumnRef(NamedTuple):
    database: str
    schema: str
    table: str
    column: str

    def __str__(self) -> str:
        return ".".join(self)

    @property
    def relation(self) -> str:
        return f"{self.schema}.{self.table}"


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$", description="Unique; lower-case "
                      "letters, digits and underscores (it names the rule's metadata)")
    column: str = Field(description="<database>.<schema>.<table>.<column>, with the SOURCE "
                        "database name")

    @field_validator("column")
    @classmethod
    def _four_parts(cls, value: str) -> str:
        parts = value.split(".")
        if len(parts) != 4 or not all(p.strip() == p and p for p in parts):
            raise ValueError(f"{value!r} is not <database>.<schema>.<table>.<column> (four "
                             "non-empty names separated by dots)")
        return value

    @property
    def ref(self) -> ColumnRef:
        return ColumnRef(*self.column.split("."))


class MilvusIdsInColumn(_Rule):
    """The column holds the primary key of every entity of the matching collections."""

    check: Literal["milvus_ids_in_column"]
    collections: list[str] = Field(min_length=1, description="Milvus collection names or glob "
                                   "patterns (source names); each must match at least one")

    @field_validator("collections", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def statement(self) -> str:
        return (f"{self.column} holds the primary key of every entity of Milvus collection(s) "
                f"{', '.join(self.collections)}")


class ColumnValuesAreObjects(_Rule):
    """Every non-null value of the column is an object key (in ``bucket``, or ``bucket/key``)."""

    check: Literal["column_values_are_objects"]
    bucket: str | None = Field(default=None, description="The bucket (source name) holding "
                               "the keys; empty: values are '<bucket>/<key>' across the "
                               "backed-up buckets")

    @property
    def statement(self) -> str:
        where = (f"an object key in bucket {self.bucket}" if self.bucket
                 else "'<bucket>/<key>' of an object in the backed-up buckets")
        return f"every non-null {self.column} is {where}"


Rule = Annotated[MilvusIdsInColumn | ColumnValuesAreObjects, Field(discriminator="check")]


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> RuleFile:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}; names must be unique")
            seen.add(rule.name)
        return self


def _rule_label(doc: Any, index: int) -> str:
    try:
        name = doc["rules"][index].get("name")
    except (TypeError, KeyError, IndexError, AttributeError):
        name = None
    return f"rule {index + 1}" + (f" ({name!r})" if name else "")


def _error_text(error: Mapping[str, Any], doc: Any) -> str:
    loc = list(error["loc"])
    where = "top level (a mapping with a list of rules under 'rules')"
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        where = _rule_label(doc, loc[1])
        loc = [p for p in loc[2:] if p not in ("milvus_ids_in_column",
                                               "column_values_are_objects")]
    field_name = ".".join(str(p) for p in loc)
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {field_name + ': ' if field_name else ''}{message}"


def parse_rules(text: str, where: str) -> list[MilvusIdsInColumn | ColumnValuesAreObjects]:
    """Rules from YAML or JSON text; ``where`` names the source in every error."""
    try:
        doc = json.loads(text) if where.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidRequest(f"{where} is not valid {'JSON' if where.endswith('.json') else 'YAML'}"
                             f": {exc}") from exc
    try:
        return list(RuleFile.model_validate(doc).rules)
    except ValidationError as exc:
        problems = "; ".join(_error_text(e, doc) for e in exc.errors())
        raise InvalidRequest(f"{where} is invalid: {problems}") from exc


def load_rules(path: str | os.PathLike[str]) -> list[MilvusIdsInColumn | ColumnValuesAreObjects]:
    where = f"drill rules file {os.fspath(path)}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{where} ({RULES_ENV}) cannot be read: {exc}; point {RULES_ENV} "
                             "at a readable YAML or JSON file, or unset it for the built-in "
                             "rules") from exc
    return parse_rules(text, where)


def default_rules() -> list[MilvusIdsInColumn | ColumnValuesAreObjects]:
    return parse_rules(DEFAULT_RULES, "built-in drill rules")


def rules_from_environment(environ: Mapping[str, str] = os.environ
                           ) -> tuple[list[MilvusIdsInColumn | ColumnValuesAreObjects], str]:
    """The rules of ``RAG_DRILL_RULES_FILE`` (or the built-in ones) and where they came from."""
    path = environ.get(RULES_ENV, "").strip()
    if not path:
        return default_rules(), "built-in (the RAG service's data model)"
    return load_rules(path), path


# -- what was restored, and the results -----------------------------------------------------

@dataclass
class RestoredData:
    """Where a drill put each store's restored data, keyed by SOURCE name; ``not_restored``
    says why a store (``postgres``, ``milvus``, ``minio``) has nothing to check."""

    postgres: PostgresServer | None = None
    databases: dict[str, str] = field(default_factory=dict)
    milvus: MilvusServer | None = None
    collections: dict[str, str] = field(default_factory=dict)
    s3: S3Endpoint | None = None
    buckets: dict[str, str] = field(default_factory=dict)
    not_restored: dict[str, str] = field(default_factory=dict)


@dataclass
class RuleResult:
    """What one rule checked (numbers per kind: rows, ids, keys, ...) and what it found."""

    name: str
    check: str
    statement: str
    status: str = NOT_RUN
    checked: dict[str, int] = field(default_factory=dict)
    violations: int = 0
    examples: list[str] = field(default_factory=list)
    reason: str = ""  # why it did not run

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def summary(self) -> str:
        if self.status == NOT_RUN:
            return f"rule {self.name} not run: {self.reason}"
        counts = ", ".join(f"{n} {what}" for what, n in self.checked.items())
        if self.status == PASSED:
            return f"rule {self.name} passed ({counts} checked)"
        return (f"rule {self.name} failed: {self.violations} violation(s) of \"{self.statement}"
                f"\" ({counts} checked), e.g. {', '.join(self.examples)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "check": self.check, "statement": self.statement,
                "status": self.status, "checked": dict(self.checked),
                "violations": self.violations, "examples": list(self.examples),
                "reason": self.reason}


class _NotRun(Exception):
    """The rule cannot be evaluated on the restored data; the message says why."""


def evaluate(rules: Iterable[MilvusIdsInColumn | ColumnValuesAreObjects],
             data: RestoredData) -> list[RuleResult]:
    """Every rule evaluated on the restored data; a rule that cannot run says why."""
    results = []
    for rule in rules:
        result = RuleResult(rule.name, rule.check, rule.statement)
        try:
            if isinstance(rule, MilvusIdsInColumn):
                _milvus_ids_in_column(rule, data, result)
            else:
                _column_values_are_objects(rule, data, result)
            result.status = FAILED if result.violations else PASSED
        except _NotRun as exc:
            result.status, result.reason = NOT_RUN, str(exc)
        except Exception as exc:  # noqa: BLE001 - a check that broke did not run; say why
            result.status, result.reason = NOT_RUN, f"the check itself failed: {exc}".strip()
            result.violations, result.examples = 0, []
        results.append(result)
    return results


# -- evaluation ------------------------------------------------------------------------------

def _restored_database(ref: ColumnRef, data: RestoredData) -> str:
    if "postgres" in data.not_restored or data.postgres is None:
        why = data.not_restored.get("postgres", "not part of this restore")
        raise _NotRun(f"PostgreSQL was not restored ({why})")
    if ref.database not in data.databases:
        raise _NotRun(f"database {ref.database!r} is not in the restored PostgreSQL backup "
                      f"(it has {', '.join(sorted(data.databases)) or 'none'})")
    return data.databases[ref.database]


def _require_column(cur, ref: ColumnRef, restored_as: str) -> None:
    cur.execute("SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN "
                "('r', 'p', 'v', 'm', 'f')", (ref.schema, ref.table))
    row = cur.fetchone()
    if row is None:
        raise _NotRun(f"table {ref.relation} does not exist in database {ref.database!r} "
                      f"(restored as {restored_as!r})")
    cur.execute("SELECT 1 FROM pg_attribute WHERE attrelid = %s AND attname = %s "
                "AND attnum > 0 AND NOT attisdropped", (row[0], ref.column))
    if cur.fetchone() is None:
        raise _NotRun(f"column {ref.column!r} does not exist in table {ref.relation} of "
                      f"database {ref.database!r} (restored as {restored_as!r})")


def _copy_rows(cur, table: str, rows: Iterable[tuple[str, ...]]) -> int:
    """Stream ``rows`` into ``table`` with COPY, ``COPY_BATCH`` rows at a time."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n")
    total = pending = 0

    def flush() -> None:
        nonlocal pending
        if pending:
            buffer.seek(0)
            cur.copy_expert(f"COPY {table} FROM STDIN WITH (FORMAT csv)", buffer)
            buffer.seek(0)
            buffer.truncate()
            pending = 0

    for row in rows:
        writer.writerow(row)
        total, pending = total + 1, pending + 1
        if pending >= COPY_BATCH:
            flush()
    flush()
    return total


def _column(ref: ColumnRef) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(ref.schema), sql.Identifier(ref.table))


def _non_null_rows(cur, ref: ColumnRef) -> int:
    cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} IS NOT NULL").format(
        _column(ref), sql.Identifier(ref.column)))
    return int(cur.fetchone()[0])


class _Scratch:
    """One transaction on the restored database; its temporary tables vanish with it."""

    def __init__(self, server: PostgresServer, database: str) -> None:
        self.conn = server.connect(database)

    def __enter__(self):
        self.cur = self.conn.cursor()
        return self.cur

    def __exit__(self, *exc: object) -> None:
        try:
            self.conn.rollback()
        finally:
            self.conn.close()


def _require_restored(data: RestoredData, store: str, name: str, handle: Any) -> None:
    """The rule cannot run when its store was not restored (``handle`` is its connection)."""
    if store in data.not_restored or handle is None:
        why = data.not_restored.get(store, "not part of this restore")
        raise _NotRun(f"{name} was not restored ({why})")


def _milvus_ids_in_column(rule: MilvusIdsInColumn, data: RestoredData,
                          result: RuleResult) -> None:
    ref = rule.ref
    database = _restored_database(ref, data)
    _require_restored(data, "milvus", "Milvus", data.milvus)
    chosen: dict[str, str] = {}
    for pattern in rule.collections:
        matched = {s: t for s, t in data.collections.items() if fnmatchcase(s, pattern)}
        if not matched:
            raise _NotRun(f"no collection of the restored Milvus backup matches {pattern!r} "
                          f"(it has {', '.join(sorted(data.collections)) or 'none'})")
        chosen.update(matched)
    assert data.postgres is not None
    with _Scratch(data.postgres, database) as cur:
        _require_column(cur, ref, database)
        cur.execute("CREATE TEMP TABLE rag_drill_ids (collection text NOT NULL, "
                    "id text NOT NULL) ON COMMIT DROP")
        ids = 0
        for source, target in sorted(chosen.items()):
            ids += _copy_rows(cur, "rag_drill_ids", ((source, str(key)) for batch in
                              milvus_engine.iter_primary_keys(data.milvus, target)
                              for key in batch))
        result.checked = {"collections": len(chosen), "ids": ids,
                          "rows": _non_null_rows(cur, ref)}
        cur.execute("ANALYZE rag_drill_ids")
        cur.execute(sql.SQL(
            "SELECT m.collection, m.id, count(*) OVER () FROM rag_drill_ids m "
            "WHERE NOT EXISTS (SELECT 1 FROM {} t WHERE t.{}::text = m.id) "
            "ORDER BY m.collection, length(m.id), m.id LIMIT %s").format(
                _column(ref), sql.Identifier(ref.column)), (EXAMPLES,))
        rows = cur.fetchall()
    result.violations = int(rows[0][2]) if rows else 0
    result.examples = [f"{collection} id {key}" for collection, key, _ in rows]


def _object_keys(s3: S3Endpoint, buckets: Mapping[str, str], prefixed: bool
                 ) -> Iterator[tuple[str]]:
    """Every object key of the restored buckets (``<source bucket>/<key>`` when ``prefixed``),
    page by page."""
    client = s3.client()
    for source, target in sorted(buckets.items()):
        with minio_engine.s3_errors(s3, "listing the restored objects", target):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=target):
                for obj in page.get("Contents", []):
                    yield (f"{source}/{obj['Key']}" if prefixed else obj["Key"],)


def _column_values_are_objects(rule: ColumnValuesAreObjects, data: RestoredData,
                               result: RuleResult) -> None:
    ref = rule.ref
    database = _restored_database(ref, data)
    _require_restored(data, "minio", "MinIO", data.s3)
    if rule.bucket is not None and rule.bucket not in data.buckets:
        raise _NotRun(f"bucket {rule.bucket!r} is not in the restored MinIO backup (it has "
                      f"{', '.join(sorted(data.buckets)) or 'none'})")
    if not data.buckets:
        raise _NotRun("the restored MinIO backup has no bucket")
    buckets = {rule.bucket: data.buckets[rule.bucket]} if rule.bucket else data.buckets
    assert data.postgres is not None
    with _Scratch(data.postgres, database) as cur:
        _require_column(cur, ref, database)
        cur.execute("CREATE TEMP TABLE rag_drill_keys (key text NOT NULL) ON COMMIT DROP")
        keys = _copy_rows(cur, "rag_drill_keys",
                          _object_keys(data.s3, buckets, prefixed=rule.bucket is None))
        result.checked = {"buckets": len(buckets), "keys": keys,
                          "rows": _non_null_rows(cur, ref)}
        cur.execute("ANALYZE rag_drill_keys")
        cur.execute(sql.SQL(
            "SELECT t.{col}::text, count(*) OVER () FROM {rel} t WHERE t.{col} IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM rag_drill_keys k WHERE k.key = t.{col}::text) "
            "ORDER BY 1 LIMIT %s").format(col=sql.Identifier(ref.column), rel=_column(ref)),
            (EXAMPLES,))
        rows = cur.fetchall()
    result.violations = int(rows[0][1]) if rows else 0
    result.examples = [value for value, _ in rows]


__all__ = [
    "DEFAULT_RULES", "FAILED", "NOT_RUN", "PASSED", "RULES_ENV", "ColumnValuesAreObjects",
    "MilvusIdsInColumn", "RestoredData", "RuleResult", "default_rules", "evaluate",
    "load_rules", "parse_rules", "rules_from_environment",
]
