"""Cross-store consistency rules: the rule file, and each rule evaluated on real stores.

The rules are evaluated here on the live seeded stores, each source name mapped to itself (a
drill maps them to its scratch copies; see test_recovery.py for that).
"""

from __future__ import annotations

import json

import pytest

from rag_backup import consistency
from rag_backup.consistency import NOT_RUN, PASSED, RestoredData
from rag_backup.engines.milvus import MilvusServer
from rag_backup.engines.minio import S3Endpoint
from rag_backup.errors import InvalidRequest
from rag_backup_tests import pgutil

STACK_SERVICES = ("postgres", "s3", "milvus")
SERVICE_DB = "kb_consistency"  # a service database not named ragqa
MISSING_THUMB = "thumbnails/never-uploaded.png"


@pytest.fixture(scope="module")
def s3(stack_env) -> S3Endpoint:
    return S3Endpoint(stack_env["RAG_S3_ENDPOINT"], stack_env["RAG_S3_ACCESS_KEY"],
                      stack_env["RAG_S3_SECRET_KEY"])


@pytest.fixture(scope="module")
def milvus(stack_env) -> MilvusServer:
    return MilvusServer(stack_env["RAG_MILVUS_URI"])


@pytest.fixture(scope="module")
def documents(pg) -> list[tuple[int, str, str | None]]:
    return pgutil.execute(pg, "ragqa", "SELECT id, object_key, image_key FROM documents "
                                       "ORDER BY id")


@pytest.fixture(scope="module")
def service_db(pg, documents):
    """``kb_consistency.lib.papers``: one row per document with an image, except the first 3
    of them; ``file_ref`` a key of bucket ``documents``; one ``thumb_ref`` was never uploaded."""
    with_images = [d for d in documents if d[2]]
    rows = ", ".join(f"({i}, '{key.split('/', 1)[1]}', "
                     f"'{MISSING_THUMB if n == 0 else image.split('/', 1)[1]}')"
                     for n, (i, key, image) in enumerate(with_images[3:]))
    pgutil.create_database(pg, SERVICE_DB, "CREATE SCHEMA lib; CREATE TABLE lib.papers ("
                           "pid bigint PRIMARY KEY, file_ref text NOT NULL, thumb_ref text);"
                           f"INSERT INTO lib.papers VALUES {rows};")
    yield [d[0] for d in with_images[:3]]
    pgutil.drop_database(pg, SERVICE_DB)


def live(pg, milvus, s3, **overrides) -> RestoredData:
    """The live stores as if they had been restored under their own names."""
    data = RestoredData(postgres=pg, databases={"ragqa": "ragqa", SERVICE_DB: SERVICE_DB},
                        milvus=milvus, collections={"ministry_text": "ministry_text",
                                                    "ministry_images": "ministry_images"},
                        s3=s3, buckets={"documents": "documents", "models": "models"})
    for name, value in overrides.items():
        setattr(data, name, value)
    return data


def rules(text: str):
    return consistency.parse_rules(text, "test rules")


def object_count(s3: S3Endpoint, bucket: str) -> int:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sum(page.get("KeyCount", 0) for page in pages)


def test_the_default_rules_hold_on_the_seeded_service_and_say_what_they_checked(
        pg, milvus, s3, documents):
    results = consistency.evaluate(consistency.default_rules(), live(pg, milvus, s3))
    by_name = {r.name: r for r in results}
    assert list(by_name) == ["vectors_have_documents", "document_objects_exist",
                             "document_images_exist"]
    assert all(r.status == PASSED and r.violations == 0 for r in results), results
    with_images = sum(1 for d in documents if d[2])
    assert by_name["vectors_have_documents"].checked == {
        "collections": 2, "ids": len(documents) + with_images, "rows": len(documents)}
    keys = object_count(s3, "documents") + object_count(s3, "models")
    assert by_name["document_objects_exist"].checked == {"buckets": 2, "keys": keys,
                                                         "rows": len(documents)}
    assert by_name["document_images_exist"].checked["rows"] == with_images


def test_rules_on_a_database_not_named_ragqa_name_their_violations(
        pg, milvus, s3, service_db, documents, monkeypatch):
    monkeypatch.setattr(consistency, "COPY_BATCH", 97)  # many COPY batches, same answer
    results = consistency.evaluate(rules(f"""
rules:
  - name: image_vectors_have_papers
    check: milvus_ids_in_column
    collections: ministry_im*
    column: {SERVICE_DB}.lib.papers.pid
  - name: paper_files_exist
    check: column_values_are_objects
    bucket: documents
    column: {SERVICE_DB}.lib.papers.file_ref
  - name: paper_thumbs_exist
    check: column_values_are_objects
    bucket: documents
    column: {SERVICE_DB}.lib.papers.thumb_ref
"""), live(pg, milvus, s3))
    vectors, files, thumbs = results
    with_images = sum(1 for d in documents if d[2])
    assert vectors.status == "failed" and vectors.violations == 3
    assert vectors.examples == [f"ministry_images id {i}" for i in service_db]
    assert vectors.checked == {"collections": 1, "ids": with_images, "rows": with_images - 3}
    assert "3 violation(s)" in vectors.summary() and str(service_db[0]) in vectors.summary()
    assert files.status == PASSED and files.checked["rows"] == with_images - 3
    assert files.checked["keys"] == object_count(s3, "documents")
    assert thumbs.status == "failed" and thumbs.violations == 1
    assert thumbs.examples == [MISSING_THUMB]


def test_a_rule_on_anything_absent_is_not_run_and_says_why(pg, milvus, s3, service_db):
    results = consistency.evaluate(rules(f"""
rules:
  - {{name: no_database, check: milvus_ids_in_column, collections: [ministry_text],
      column: archive.public.documents.id}}
  - {{name: no_table, check: column_values_are_objects, column: {SERVICE_DB}.lib.books.ref}}
  - {{name: no_column, check: column_values_are_objects, column: {SERVICE_DB}.lib.papers.isbn}}
  - {{name: no_collection, check: milvus_ids_in_column, collections: [ministry_text, audio_*],
      column: {SERVICE_DB}.lib.papers.pid}}
  - {{name: no_bucket, check: column_values_are_objects, bucket: invoices,
      column: {SERVICE_DB}.lib.papers.file_ref}}
"""), live(pg, milvus, s3))
    reasons = {r.name: r.reason for r in results}
    assert all(r.status == NOT_RUN and not r.passed for r in results), results
    assert reasons["no_database"].startswith("database 'archive' is not in the restored "
                                             "PostgreSQL backup")
    assert reasons["no_table"] == (f"table lib.books does not exist in database "
                                   f"'{SERVICE_DB}' (restored as '{SERVICE_DB}')")
    assert reasons["no_column"].startswith("column 'isbn' does not exist in table lib.papers")
    assert reasons["no_collection"].startswith("no collection of the restored Milvus backup "
                                               "matches 'audio_*'")
    assert reasons["no_bucket"].startswith("bucket 'invoices' is not in the restored MinIO "
                                           "backup (it has documents, models)")
    assert all(f"rule {r.name} not run: {r.reason}" == r.summary() for r in results)


def test_a_store_that_was_not_restored_leaves_its_rules_not_run(pg, milvus, s3):
    data = live(pg, milvus, s3, not_restored={"minio": "pg_restore failed: boom"},
                buckets={})
    vectors, objects, images = consistency.evaluate(consistency.default_rules(), data)
    assert vectors.status == PASSED
    assert objects.status == images.status == NOT_RUN
    assert objects.reason == "MinIO was not restored (pg_restore failed: boom)"
    data = live(pg, milvus, s3, not_restored={"postgres": "unreachable"}, databases={})
    assert {r.reason for r in consistency.evaluate(consistency.default_rules(), data)} == {
        "PostgreSQL was not restored (unreachable)"}


@pytest.mark.parametrize(("text", "suffix", "expected"), [
    ("rules:\n  - {name: a, check: milvus_ids_in_column, collections: [x], column: d.s.t.c}\n"
     "  - {name: bad, check: sql_query, column: d.s.t.c}\n", ".yaml",
     "rule 2 ('bad'): Input tag 'sql_query' found using 'check' does not match"),
    ("rules:\n  - {name: ok, check: column_values_are_objects, column: d.s.t.c}\n"
     "  - {name: short, check: column_values_are_objects, column: ragqa.documents.id}\n",
     ".yml", "rule 2 ('short'): column: 'ragqa.documents.id' is not "
     "<database>.<schema>.<table>.<column>"),
    ("rules:\n  - {name: twice, check: column_values_are_objects, column: d.s.t.c}\n"
     "  - {name: twice, check: column_values_are_objects, column: d.s.t.c}\n", ".yaml",
     "two rules are named 'twice'"),
    ("rules:\n  - {name: typo, check: column_values_are_objects, column: d.s.t.c, "
     "buckets: documents}\n", ".yaml", "rule 1 ('typo'): buckets: Extra inputs are not "
     "permitted"),
    ("rules:\n  - {name: none, check: milvus_ids_in_column, column: d.s.t.c}\n", ".yaml",
     "rule 1 ('none'): collections: Field required"),
    ("rules: [\n", ".yaml", "is not valid YAML"),
    ('{"rules": []}', ".json", "rules: List should have at least 1 item"),
    ('{"rules": [}', ".json", "is not valid JSON"),
])
def test_a_bad_rules_file_is_refused_naming_the_file_and_the_rule(tmp_path, text, suffix,
                                                                   expected):
    path = tmp_path / f"rules{suffix}"
    path.write_text(text)
    with pytest.raises(InvalidRequest) as caught:
        consistency.load_rules(path)
    assert f"drill rules file {path}" in str(caught.value)
    assert expected in str(caught.value)


def test_the_rules_file_comes_from_the_environment(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"rules": [{"name": "files", "check": "column_values_are_objects",
                                           "column": "kb.public.papers.file",
                                           "bucket": "papers"}]}))
    [rule], source = consistency.rules_from_environment({consistency.RULES_ENV: str(path)})
    assert source == str(path)
    assert (rule.name, rule.ref.database, rule.ref.relation, rule.bucket) == (
        "files", "kb", "public.papers", "papers")
    defaults, source = consistency.rules_from_environment({})
    assert [r.name for r in defaults] == ["vectors_have_documents", "document_objects_exist",
                                          "document_images_exist"]
    with pytest.raises(InvalidRequest, match=f"drill rules file {tmp_path}/absent.yaml "
                       r"\(RAG_DRILL_RULES_FILE\) cannot be read"):
        consistency.rules_from_environment({consistency.RULES_ENV: str(tmp_path / "absent.yaml")})
