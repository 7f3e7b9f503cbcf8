"""Helpers for PostgreSQL tests: independent of the code under test (psycopg2 and pg_dump)."""

from __future__ import annotations

import subprocess

import psycopg2
from psycopg2 import sql

from rag_backup.engines.postgres import PostgresServer

RICH_SCHEMA = r"""
CREATE SCHEMA app;
CREATE SCHEMA audit;
CREATE SCHEMA "Mixed Case";
CREATE TABLE app.documents (
    id bigserial PRIMARY KEY,
    title text NOT NULL,
    body text,
    meta jsonb,
    raw bytea,
    created_at timestamptz NOT NULL DEFAULT '2026-11-01 10:00:00+00'
);
INSERT INTO app.documents (title, body, meta, raw)
SELECT 'दस्तावेज़ ' || g, 'भारत सरकार का संस्कृति मंत्रालय — English body ' || g,
       jsonb_build_object('n', g, 'tags', jsonb_build_array('हिंदी', 'en'),
                          'nested', jsonb_build_object('ok', g % 2 = 0)),
       decode(md5(g::text), 'hex')
FROM generate_series(1, 5000) g;
CREATE SEQUENCE audit.ticket_seq START 1000;
SELECT setval('audit.ticket_seq', 4242);
CREATE TABLE audit.events (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    doc_id bigint REFERENCES app.documents(id),
    note text
);
INSERT INTO audit.events (doc_id, note) SELECT g, 'नोट ' || g FROM generate_series(1, 500) g;
CREATE TABLE "Mixed Case"."odd table" (x int, "Quoted Col" text);
INSERT INTO "Mixed Case"."odd table" VALUES (1, 'एक'), (2, 'two'), (3, NULL);
CREATE VIEW app.recent AS SELECT id, title FROM app.documents WHERE id > 4000;
CREATE MATERIALIZED VIEW audit.doc_count AS SELECT count(*) AS n FROM app.documents;
CREATE FUNCTION app.title_length(d app.documents) RETURNS int LANGUAGE sql IMMUTABLE
    AS $$ SELECT length(d.title) $$;
CREATE INDEX documents_meta_idx ON app.documents USING gin (meta);
SELECT lo_from_bytea(0, convert_to('बड़ा ऑब्जेक्ट — a large object', 'UTF8'));
"""


def admin(pg: PostgresServer):
    conn = psycopg2.connect(pg.dsn("postgres"), password=pg.password)
    conn.autocommit = True
    return conn


def execute(pg: PostgresServer, database: str, statement: str) -> list[tuple]:
    conn = psycopg2.connect(pg.dsn(database), password=pg.password)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def create_database(pg: PostgresServer, name: str, schema_sql: str = RICH_SCHEMA) -> None:
    conn = admin(pg)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    if schema_sql:
        execute(pg, name, schema_sql)


def drop_database(pg: PostgresServer, name: str) -> None:
    conn = admin(pg)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
    finally:
        conn.close()


def databases(pg: PostgresServer) -> set[str]:
    return {r[0] for r in execute(pg, "postgres", "SELECT datname FROM pg_database")}


def plain_dump(pg: PostgresServer, database: str) -> str:
    """A plain-SQL pg_dump (the native tool, not our code), large objects included."""
    proc = subprocess.run(
        [pg.tool("pg_dump"), "--format=plain", "-b", "--restrict-key=roundtrip", "--no-password",
         f"--dbname={pg.dsn(database)}"],
        capture_output=True, timeout=300, env={"PGPASSWORD": pg.password, "PATH": "/usr/bin:/bin"},
        check=True)
    return proc.stdout.decode()
