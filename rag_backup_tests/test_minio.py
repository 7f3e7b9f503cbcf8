"""MinIO end to end against the stack's S3 server (moto over real HTTP): engine, assets, restore.

Every test works in its own buckets (uuid names); objects are compared with plain boto3 calls
(listing, GET, HEAD), independent of the engine.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import boto3
import dagster as dg
import pytest
import zstandard
from botocore.config import Config

from rag_backup.defs import minio as minio_defs
from rag_backup.defs.resources import BackupRepositoryResource, MinioResource
from rag_backup.engines import minio as engine
from rag_backup.errors import (
    ConfirmationRequired,
    CredentialsRejected,
    IntegrityError,
    InvalidRequest,
    StoreUnreachable,
)
from rag_backup.repository import BackupRepository, S3Backend
from rag_backup.repository.manifest import utcnow
from rag_backup_tests.conftest import take_backup as committed
from rag_backup_tests.killing import kill_backup_while_writing

# The engine's modules whose names tests patch (the package's ``restore`` is the function).
minio_objects = importlib.import_module("rag_backup.engines.minio.objects")
minio_restore = importlib.import_module("rag_backup.engines.minio.restore")

STACK_SERVICES = ("postgres", "s3")  # the stores these tests need (see conftest)

TODAY = utcnow().strftime("%Y-%m-%d")
YESTERDAY = (utcnow() - timedelta(days=1)).strftime("%Y-%m-%d")
WINDOW = timedelta(days=14)
MB = 1024 * 1024
HEADERS = ("CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage")
UNSAFE_KEYS = ("a b c.txt", "ünïcødé/फ़ाइल.pdf", "../escape", "../../../../tmp/escape",
               "/leading", "a/../b", "a//b", "./x", "..", "dir/", "%2F.txt", "q?x=1#h",
               "tab\tkey", "+plus", "objectstore/blobs/00/not-a-blob", "minio/manifest.json")


@pytest.fixture(scope="session")
def s3(stack_env) -> engine.S3Endpoint:
    return engine.S3Endpoint(stack_env["RAG_S3_ENDPOINT"], stack_env["RAG_S3_ACCESS_KEY"],
                             stack_env["RAG_S3_SECRET_KEY"], stack_env["RAG_S3_REGION"])


@pytest.fixture(scope="session")
def client(stack_env):
    """A plain boto3 client: the independent side of every comparison."""
    return boto3.client("s3", endpoint_url=stack_env["RAG_S3_ENDPOINT"],
                        aws_access_key_id=stack_env["RAG_S3_ACCESS_KEY"],
                        aws_secret_access_key=stack_env["RAG_S3_SECRET_KEY"],
                        region_name=stack_env["RAG_S3_REGION"],
                        config=Config(s3={"addressing_style": "path"},
                                      max_pool_connections=16))


def empty_bucket(client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


@pytest.fixture
def new_bucket(client):
    """Make fresh uuid-named buckets (``new_bucket()``); they are removed afterwards. A name
    from ``new_bucket(create=False)`` is only removed if something created it."""
    made: list[str] = []

    def make(create: bool = True) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        if create:
            client.create_bucket(Bucket=name)
        made.append(name)
        return name

    yield make
    existing = {b["Name"] for b in client.list_buckets()["Buckets"]}
    for name in made:
        if name in existing:
            empty_bucket(client, name)
            client.delete_bucket(Bucket=name)


def put(client, bucket: str, key: str, body: bytes, content_type: str = "application/pdf",
        metadata: dict[str, str] | None = None, **extra) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type,
                      Metadata=metadata or {}, **extra)


def tags_of(client, bucket: str, key: str) -> dict[str, str]:
    return {t["Key"]: t["Value"]
            for t in client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}


def set_tags(client, bucket: str, key: str, tags: dict[str, str]) -> None:
    client.put_object_tagging(Bucket=bucket, Key=key, Tagging={
        "TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]})


def bucket_state(client, bucket: str, prefix: str = "") -> dict[str, tuple]:
    """Every object: sha256 and length of its bytes (GET), content type, user metadata and
    the other PUT headers (HEAD), and its tags, found by listing."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            head = client.head_object(Bucket=bucket, Key=obj["Key"])
            out[obj["Key"]] = (hashlib.sha256(body).hexdigest(), len(body), head["ContentType"],
                               head["Metadata"], {h: head.get(h) for h in HEADERS},
                               tags_of(client, bucket, obj["Key"]))
    return out


def fill_varied(client, bucket: str) -> None:
    """Sizes from empty to a multipart upload, content types, metadata, other headers."""
    put(client, bucket, "raw/empty.txt", b"", "text/plain")
    put(client, bucket, "raw/100001.html", "<p>प्रधानमंत्री किसान</p>".encode(), "text/html",
        {"source": "agriwelfare.gov.in", "lang": "hi"})
    put(client, bucket, "processed/100001.json", b'{"id": 100001}', "application/json",
        {"doc-id": "100001"}, CacheControl="max-age=60", ContentLanguage="hi",
        ContentDisposition='attachment; filename="100001.json"')
    put(client, bucket, "processed/notes.txt.gz", gzip.compress(b"notes " * 1000), "text/plain",
        ContentEncoding="gzip")
    put(client, bucket, "images/scan.png", os.urandom(300_000), "image/png", {"w": "640"})
    put(client, bucket, "models/large.bin", os.urandom(9 * MB), "application/octet-stream",
        {"model": "ministry-qa-v1"})
    upload = client.create_multipart_upload(Bucket=bucket, Key="models/multipart.bin",
                                            ContentType="application/x-safetensors",
                                            Metadata={"parts": "2"})
    parts = []
    for number, data in enumerate((os.urandom(5 * MB), os.urandom(MB)), start=1):
        resp = client.upload_part(Bucket=bucket, Key="models/multipart.bin", PartNumber=number,
                                  UploadId=upload["UploadId"], Body=data)
        parts.append({"PartNumber": number, "ETag": resp["ETag"]})
    client.complete_multipart_upload(Bucket=bucket, Key="models/multipart.bin",
                                     UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": parts})


def take(repo: BackupRepository, s3: engine.S3Endpoint, buckets: list[str],
         partition: str = TODAY, verify: bool = True, **kwargs) -> engine.BackupOutcome:
    outcome, _ = committed(
        repo, "minio", partition,
        lambda pending: engine.backup(s3, pending, buckets, window=WINDOW, **kwargs),
        (lambda record: engine.verify(repo, record)) if verify else None)
    return outcome


def blob_files(repo_dir: Path) -> dict[str, Path]:
    root = repo_dir / "objectstore" / "blobs"
    return {p.name: p for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def referenced(repo: BackupRepository) -> set[str]:
    return engine.referenced_blobs(repo)[1]


# -- round trips ---------------------------------------------------------------------------

def test_round_trip_in_place_and_into_a_new_bucket_keeps_bytes_and_metadata(
        client, s3, repo, new_bucket):
    bucket = new_bucket()
    fill_varied(client, bucket)
    before = bucket_state(client, bucket)
    outcome = take(repo, s3, [bucket])
    assert outcome.objects == len(before) == 7
    assert outcome.bytes == sum(v[1] for v in before.values())
    assert outcome.fingerprint["buckets"][bucket] == {"objects": 7, "bytes": outcome.bytes}
    assert outcome.objects_copied == 7 and outcome.objects_reused == 0
    # The typed fingerprint reads back exactly the dict the manifest records.
    recorded = repo.get("minio", TODAY).manifest.fingerprint
    typed = engine.MinioFingerprint.from_dict(recorded)
    assert typed.to_dict() == recorded == outcome.fingerprint
    assert (typed.objects, typed.bytes, typed.objects_copied, typed.objects_reused,
            typed.incremental_from) == (7, outcome.bytes, 7, 0, None)
    assert typed.buckets[bucket] == engine.BucketCounts(7, outcome.bytes)

    empty_bucket(client, bucket)
    record = repo.resolve("minio", "latest")
    report = engine.restore(repo, record, s3)
    [b] = report.buckets
    assert (b.in_snapshot, b.restored, b.skipped_identical, b.removed) == (7, 7, 0, 0)
    assert report.matches_snapshot
    assert bucket_state(client, bucket) == before

    scratch = new_bucket(create=False)
    report = engine.restore(repo, record, s3, buckets=[bucket], target_bucket=scratch)
    assert report.buckets[0].restored == 7
    assert bucket_state(client, scratch) == before
    again = engine.restore(repo, record, s3, buckets=[bucket], target_bucket=scratch)
    assert again.buckets[0].skipped_identical == 7 and again.buckets[0].restored == 0


def test_an_object_deleted_or_overwritten_after_day_one_is_restorable_from_day_one(
        client, s3, repo, new_bucket):
    bucket = new_bucket()
    for i in range(10):
        put(client, bucket, f"doc/{i}.pdf", f"version 1 of {i}".encode(), metadata={"v": "1"})
    day1 = bucket_state(client, bucket)
    take(repo, s3, [bucket], YESTERDAY)
    client.delete_object(Bucket=bucket, Key="doc/3.pdf")
    put(client, bucket, "doc/4.pdf", b"overwritten by mistake", metadata={"v": "2"})
    day2 = bucket_state(client, bucket)
    take(repo, s3, [bucket], TODAY)

    first = new_bucket(create=False)
    engine.restore(repo, repo.resolve("minio", YESTERDAY), s3, target_bucket=first)
    assert bucket_state(client, first) == day1
    second = new_bucket(create=False)
    engine.restore(repo, repo.resolve("minio", TODAY), s3, target_bucket=second)
    assert bucket_state(client, second) == day2
    assert "doc/3.pdf" not in day2 and day1["doc/3.pdf"][0] == hashlib.sha256(
        b"version 1 of 3").hexdigest()


def test_the_next_backup_copies_only_what_changed(client, s3, repo, new_bucket):
    bucket = new_bucket()
    for i in range(200):
        put(client, bucket, f"obj/{i:04d}", f"content {i} ".encode() * (i + 1))
    first = take(repo, s3, [bucket], YESTERDAY)
    assert (first.objects_copied, first.objects_reused) == (200, 0)

    changed = {"obj/0007": b"changed seven", "obj/0150": b"changed one hundred fifty!"}
    for key, body in changed.items():
        put(client, bucket, key, body)
    second = take(repo, s3, [bucket], TODAY)
    assert second.reuse_source == YESTERDAY
    assert (second.objects, second.objects_copied, second.objects_reused) == (200, 2, 198)
    assert second.bytes_copied == sum(len(b) for b in changed.values())
    assert second.fingerprint["transfer"]["objects_copied"] == 2

    # A metadata-only change (copy in place) keeps the etag: no download, but a fresh HEAD.
    time.sleep(1.1)  # S3's Last-Modified has one-second resolution
    client.copy_object(Bucket=bucket, Key="obj/0001", CopySource={"Bucket": bucket,
                       "Key": "obj/0001"}, MetadataDirective="REPLACE",
                       ContentType="text/markdown", Metadata={"reviewed": "yes"})
    third = take(repo, s3, [bucket], TODAY)
    assert (third.objects_copied, third.objects_reused) == (0, 200)
    [entry] = [e for e in engine.read_snapshot(repo, repo.get("minio", TODAY), bucket)
               if e.key == "obj/0001"]
    assert entry.content_type == "text/markdown" and entry.metadata == {"reviewed": "yes"}


def test_unsafe_keys_round_trip_and_never_become_paths(client, s3, repo, repo_dir, new_bucket,
                                                       tmp_path):
    bucket = new_bucket()
    for i, key in enumerate(UNSAFE_KEYS):
        put(client, bucket, key, f"body {i} of {key!r}".encode(), metadata={"n": str(i)})
    before = bucket_state(client, bucket)
    assert set(before) == set(UNSAFE_KEYS)
    outcome = take(repo, s3, [bucket])
    assert outcome.objects == len(UNSAFE_KEYS)

    for path in repo_dir.rglob("*"):
        rel = path.relative_to(repo_dir).as_posix()
        assert rel.startswith(("minio", "objectstore")), rel
        if path.is_file() and rel.startswith("objectstore/"):
            assert engine.blob_sha(rel) is not None, rel
    assert not (tmp_path / "escape").exists() and not Path("/tmp/escape").exists()

    target = new_bucket(create=False)
    report = engine.restore(repo, repo.get("minio", TODAY), s3, target_bucket=target)
    assert report.matches_snapshot
    assert bucket_state(client, target) == before


def test_restore_a_prefix_and_removal_needs_the_bucket_name(client, s3, repo, new_bucket):
    bucket = new_bucket()
    for i in range(6):
        put(client, bucket, f"{'raw' if i % 2 else 'processed'}/{i}.txt", f"{i}".encode())
    snapshot = bucket_state(client, bucket)
    take(repo, s3, [bucket])
    record = repo.get("minio", TODAY)

    scratch = new_bucket(create=False)
    report = engine.restore(repo, record, s3, target_bucket=scratch, prefix="raw/")
    assert report.buckets[0].in_snapshot == report.buckets[0].restored == 3
    assert set(bucket_state(client, scratch)) == {"raw/1.txt", "raw/3.txt", "raw/5.txt"}

    put(client, bucket, "raw/added-later.txt", b"not in the snapshot")
    client.delete_object(Bucket=bucket, Key="processed/0.txt")
    for confirm in ("", "yes", "documents"):
        with pytest.raises(ConfirmationRequired, match=f"set confirm to '{bucket}'"):
            engine.restore(repo, record, s3, remove_extra=True, confirm=confirm)
    assert "raw/added-later.txt" in bucket_state(client, bucket, "raw/")
    assert "processed/0.txt" not in bucket_state(client, bucket, "processed/")

    kept = engine.restore(repo, record, s3)
    assert (kept.buckets[0].restored, kept.buckets[0].skipped_identical,
            kept.buckets[0].removed) == (1, 5, 0)
    removed = engine.restore(repo, record, s3, remove_extra=True, confirm=bucket)
    assert (removed.buckets[0].restored, removed.buckets[0].skipped_identical,
            removed.buckets[0].removed) == (0, 6, 1)
    assert bucket_state(client, bucket) == snapshot


# -- tags, the comparison after a restore, old snapshots -------------------------------------

TAGS = {
    "several": {"project": "pm-kisan", "stage": "processed", "owner": "data team",
                "retain": "2031-01-01"},
    "unicode": {"Ünïcødé": "café Ελληνικά 日本語", "empty": "", "sym": "a+b=c/d:e@f.g_h-i"},
}


def fill_tagged(client, bucket: str) -> None:
    """Tagged objects: several tags, unicode keys and values, an empty value, one object with
    none, one whose key MinIO's SDK refuses, and a multipart object larger than the restore's
    single-PUT limit (so the restore uploads it in parts, tags on the upload)."""
    put(client, bucket, "tagged/several.pdf", b"several", Tagging=engine._tag_header(
        TAGS["several"]), metadata={"source": "agriwelfare.gov.in"})
    put(client, bucket, "tagged/ünïcødé.txt", b"unicode", "text/plain",
        Tagging=engine._tag_header(TAGS["unicode"]))
    put(client, bucket, "untagged.txt", b"no tags at all", "text/plain")
    put(client, bucket, "a/../sdk-refuses.txt", b"odd key", "text/plain", Tagging="k=v")
    upload = client.create_multipart_upload(
        Bucket=bucket, Key="models/tagged-large.bin", ContentType="application/octet-stream",
        Metadata={"model": "qa-v2"}, Tagging=engine._tag_header({"model": "qa-v2",
                                                                 "size": "large"}))
    parts = []
    for number, data in enumerate((os.urandom(5 * MB), os.urandom(4 * MB)), start=1):
        resp = client.upload_part(Bucket=bucket, Key="models/tagged-large.bin",
                                  PartNumber=number, UploadId=upload["UploadId"], Body=data)
        parts.append({"PartNumber": number, "ETag": resp["ETag"]})
    client.complete_multipart_upload(Bucket=bucket, Key="models/tagged-large.bin",
                                     UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": parts})


def found(comparison) -> set[tuple[str, str]]:
    return {(d.item, d.property) for d in comparison.differences}


def test_tags_round_trip_in_place_and_into_a_new_bucket(client, s3, repo, new_bucket):
    bucket = new_bucket()
    fill_tagged(client, bucket)
    before = bucket_state(client, bucket)
    assert before["tagged/ünïcødé.txt"][5] == TAGS["unicode"]
    assert before["untagged.txt"][5] == {} and before["a/../sdk-refuses.txt"][5] == {"k": "v"}
    take(repo, s3, [bucket])
    record = repo.get("minio", TODAY)
    recorded = {e.key: e.tags for e in engine.read_snapshot(repo, record, bucket)}
    assert recorded == {key: state[5] for key, state in before.items()}

    empty_bucket(client, bucket)
    report = engine.restore(repo, record, s3)
    assert report.buckets[0].restored == 5 and report.matches_snapshot
    assert report.comparison.matches and report.comparison.not_run == {}
    assert report.comparison.compared == {
        "objects": 5, "sizes": 5, "sha256": 5, "content_type": 5, "metadata": 5,
        "headers": 5, "tags": 5}
    assert bucket_state(client, bucket) == before

    scratch = new_bucket(create=False)
    report = engine.restore(repo, record, s3, buckets=[bucket], target_bucket=scratch)
    assert report.buckets[0].restored == 5 and report.matches_snapshot
    assert bucket_state(client, scratch) == before

    # Tags lost or changed on identical objects are put back without rewriting the objects.
    set_tags(client, scratch, "tagged/several.pdf", {"project": "changed"})
    set_tags(client, scratch, "untagged.txt", {"stray": "tag"})
    client.delete_object_tagging(Bucket=scratch, Key="models/tagged-large.bin")
    again = engine.restore(repo, record, s3, buckets=[bucket], target_bucket=scratch)
    [b] = again.buckets
    assert (b.restored, b.skipped_identical, b.tags_corrected) == (0, 5, 3)
    assert again.matches_snapshot and bucket_state(client, scratch) == before


def test_a_tag_only_change_is_caught_by_the_next_incremental_backup(
        client, s3, repo, new_bucket):
    bucket = new_bucket()
    for i in range(20):
        put(client, bucket, f"doc/{i:02d}", f"document {i}".encode(), Tagging=f"n={i}")
    take(repo, s3, [bucket], YESTERDAY)
    etag = client.head_object(Bucket=bucket, Key="doc/03")["ETag"]
    set_tags(client, bucket, "doc/03", {"n": "3", "reviewed": "yes"})
    client.delete_object_tagging(Bucket=bucket, Key="doc/07")
    assert client.head_object(Bucket=bucket, Key="doc/03")["ETag"] == etag  # nothing else moved
    second = take(repo, s3, [bucket], TODAY)
    assert (second.objects_copied, second.objects_reused) == (0, 20)
    tags = {e.key: e.tags for e in engine.read_snapshot(repo, repo.get("minio", TODAY), bucket)}
    assert tags["doc/03"] == {"n": "3", "reviewed": "yes"} and tags["doc/07"] == {}
    assert tags["doc/11"] == {"n": "11"}

    scratch = new_bucket(create=False)
    engine.restore(repo, repo.get("minio", TODAY), s3, target_bucket=scratch)
    assert bucket_state(client, scratch) == bucket_state(client, bucket)
    engine.restore(repo, repo.get("minio", YESTERDAY), s3, target_bucket=scratch)
    assert tags_of(client, scratch, "doc/03") == {"n": "3"}
    assert tags_of(client, scratch, "doc/07") == {"n": "7"}


def fill_every_third_tagged(client, bucket: str, n: int = 30) -> dict[str, dict[str, str]]:
    tags = {}
    for i in range(n):
        tags[f"doc/{i:02d}"] = {"n": str(i), "kind": "third"} if i % 3 == 0 else {}
        put(client, bucket, f"doc/{i:02d}", f"document {i}".encode(), "text/plain",
            Tagging=engine._tag_header(tags[f"doc/{i:02d}"]))
    return tags


def test_tags_of_downloaded_objects_come_from_the_get_once_the_header_is_proven(
        client, s3, repo, new_bucket):
    """moto, like S3, sends x-amz-tagging-count on a GET of a tagged object: once one tagged
    object's GetObjectTagging agreed with its GET's count, an untagged download needs no
    GetObjectTagging. With one worker the order is fixed: doc/00 (tagged) proves it."""
    bucket = new_bucket()
    tags = fill_every_third_tagged(client, bucket)
    assert client.get_object(Bucket=bucket, Key="doc/03")["TagCount"] == 2
    assert "TagCount" not in client.get_object(Bucket=bucket, Key="doc/04")
    outcome = take(repo, s3, [bucket], workers=1)
    assert outcome.fingerprint["transfer"]["tag_reads_saved"] == 20  # the untagged ones
    recorded = {e.key: e.tags for e in engine.read_snapshot(repo, repo.get("minio", TODAY),
                                                             bucket)}
    assert recorded == tags == {key: tags_of(client, bucket, key) for key in tags}

    # Nothing tagged downloaded: nothing proves the header, every object's tags are read.
    plain = new_bucket()
    for i in range(5):
        put(client, plain, f"p/{i}", b"plain")
    assert take(repo, s3, [plain], YESTERDAY).fingerprint["transfer"]["tag_reads_saved"] == 0


def test_a_server_that_does_not_report_the_tag_count_gets_every_objects_tags_read(
        client, s3, repo, new_bucket, monkeypatch):
    """A server (or credentials) that sends no x-amz-tagging-count for a tagged object is
    caught by the first tagged download: no GetObjectTagging is ever skipped."""
    bucket = new_bucket()
    tags = fill_every_third_tagged(client, bucket)
    monkeypatch.setattr(minio_objects, "TAG_COUNT_HEADER", "x-not-sent-by-this-server")
    outcome = take(repo, s3, [bucket])
    assert outcome.fingerprint["transfer"]["tag_reads_saved"] == 0
    recorded = {e.key: e.tags for e in engine.read_snapshot(repo, repo.get("minio", TODAY),
                                                             bucket)}
    assert recorded == tags


def test_the_comparison_names_every_object_and_property_that_differs(
        client, s3, repo, new_bucket):
    bucket = new_bucket()
    fill_tagged(client, bucket)
    put(client, bucket, "plain.json", b'{"a": 1}', "application/json", {"doc-id": "1"},
        CacheControl="max-age=60")
    take(repo, s3, [bucket])
    record = repo.get("minio", TODAY)
    scratch = new_bucket(create=False)
    engine.restore(repo, record, s3, target_bucket=scratch)
    assert engine.compare_bucket(repo, record, s3, bucket, scratch).matches

    # Afterwards the target loses a tag, metadata and a header, gets other bytes of the same
    # size, loses an object and gains one.
    set_tags(client, scratch, "tagged/several.pdf",
             {k: v for k, v in TAGS["several"].items() if k != "owner"})
    client.copy_object(Bucket=scratch, Key="plain.json", CopySource={
        "Bucket": scratch, "Key": "plain.json"}, MetadataDirective="REPLACE",
        ContentType="text/plain", Metadata={})
    put(client, scratch, "untagged.txt", b"NO TAGS AT ALL", "text/plain")
    client.delete_object(Bucket=scratch, Key="tagged/ünïcødé.txt")
    put(client, scratch, "extra.txt", b"not in the snapshot", "text/plain")
    # every tag gone: its GET has no x-amz-tagging-count, which alone may stand for "no tags"
    client.delete_object_tagging(Bucket=scratch, Key="models/tagged-large.bin")

    comparison = engine.compare_bucket(repo, record, s3, bucket, scratch)
    assert not comparison.matches and comparison.not_run == {}
    assert found(comparison) == {
        (f"{scratch}/models/tagged-large.bin", "tag model"),
        (f"{scratch}/models/tagged-large.bin", "tag size"),
        (f"{scratch}/tagged/several.pdf", "tag owner"),
        (f"{scratch}/plain.json", "content type"),
        (f"{scratch}/plain.json", "metadata doc-id"),
        (f"{scratch}/plain.json", "header Cache-Control"),
        (f"{scratch}/untagged.txt", "sha256"),
        (f"{scratch}/tagged/ünïcødé.txt", "object")}
    lost = {(d.property, d.expected, d.actual) for d in comparison.differences
            if d.item.endswith("several.pdf") or d.item.endswith("plain.json")}
    assert ("tag owner", "data team", None) in lost
    assert ("metadata doc-id", "1", None) in lost
    assert comparison.compared["objects"] == 6 and comparison.compared["sha256"] == 5
    # one worker, in key order: the tagged a/../sdk-refuses.txt proves the header first, so the
    # untagged-looking tagged-large.bin is judged by its GET alone; the same differences
    assert found(engine.compare_bucket(repo, record, s3, bucket, scratch, workers=1)) == \
        found(comparison)
    with_extras = engine.compare_bucket(repo, record, s3, bucket, scratch, extra_objects=True)
    assert found(with_extras) - found(comparison) == {(f"{scratch}/extra.txt", "object")}

    # The next restore puts all of it back (the extra object only with remove_extra).
    report = engine.restore(repo, record, s3, target_bucket=scratch, remove_extra=True,
                            confirm=scratch)
    assert report.matches_snapshot and report.buckets[0].removed == 1
    assert bucket_state(client, scratch) == bucket_state(client, bucket)


def test_a_difference_left_after_the_restore_fails_it_unless_accepted(
        client, s3, repo, new_bucket, monkeypatch):
    """Something else writes to the target while it is restored (here: between the writes
    and the comparison): the restore fails naming the object and the property."""
    bucket = new_bucket()
    fill_tagged(client, bucket)
    take(repo, s3, [bucket])
    record = repo.get("minio", TODAY)
    scratch = new_bucket(create=False)
    compare = minio_restore._compare

    def with_a_concurrent_writer(*args, **kwargs):
        client.delete_object_tagging(Bucket=scratch, Key="tagged/several.pdf")
        return compare(*args, **kwargs)

    monkeypatch.setattr(minio_restore, "_compare", with_a_concurrent_writer)
    with pytest.raises(engine.RestoreDiffers,
                       match=rf"{scratch}/tagged/several.pdf: tag owner is None.*"
                             "accept_differences") as refused:
        engine.restore(repo, record, s3, target_bucket=scratch)
    report = refused.value.report
    assert not report.matches_snapshot and len(report.comparison.differences) == 4
    assert report.buckets[0].restored == 5

    accepted = engine.restore(repo, record, s3, target_bucket=scratch, accept_differences=True)
    assert accepted.buckets[0].tags_corrected == 1  # put back by the restore, removed again
    assert found(accepted.comparison) == {(f"{scratch}/tagged/several.pdf", f"tag {name}")
                                          for name in TAGS["several"]}
    assert not accepted.matches_snapshot


def write_version_1_snapshot(client, repo: BackupRepository, bucket: str,
                             partition: str) -> None:
    """A snapshot as the first release wrote it (format version 1: no tags), of ``bucket`` as
    it is now, with its blobs."""
    lines, total = [], 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            got = client.get_object(Bucket=bucket, Key=obj["Key"])
            data = got["Body"].read()
            sha = hashlib.sha256(data).hexdigest()
            repo.backend.write_bytes(engine.blob_key(sha), data)
            total += len(data)
            lines.append({"key": obj["Key"], "size": len(data), "etag": obj["ETag"],
                          "last_modified": obj["LastModified"].isoformat(), "sha256": sha,
                          "content_type": got["ContentType"], "metadata": got["Metadata"],
                          "headers": {}})
    with repo.begin("minio", partition, "release-1") as pending:
        with pending.artifact(engine.snapshot_name(bucket)) as out, \
                zstandard.ZstdCompressor().stream_writer(out, closefd=False) as z:
            z.write(json.dumps({"format": engine.SNAPSHOT_FORMAT, "version": 1,
                                "bucket": bucket, "partition_key": partition,
                                "backup_id": pending.backup_id}).encode() + b"\n")
            for line in lines:
                z.write(json.dumps(line).encode() + b"\n")
        pending.commit(engine.BackupOutcome(
            {"buckets": {bucket: {"objects": len(lines), "bytes": total}},
             "objects": len(lines), "bytes": total}, {}, "release-1", {}, None))


def test_a_version_1_snapshot_restores_with_tags_reported_not_run(
        client, s3, repo, new_bucket):
    bucket = new_bucket()
    for i in range(4):
        put(client, bucket, f"doc/{i}", f"document {i}".encode(), "text/plain", {"i": str(i)},
            Tagging=f"n={i}")
    write_version_1_snapshot(client, repo, bucket, YESTERDAY)
    record = repo.get("minio", YESTERDAY)
    first_release = engine.fingerprint_of(record)  # no transfer, no incremental_from
    assert (first_release.objects, first_release.transfer, first_release.bucket_names) == (
        4, None, [bucket])
    engine.verify(repo, record)
    assert {e.tags for e in engine.read_snapshot(repo, record, bucket)} == {None}

    scratch = new_bucket(create=False)
    report = engine.restore(repo, record, s3, target_bucket=scratch)
    assert report.buckets[0].restored == 4 and report.comparison.differences == []
    assert "tags" not in report.comparison.compared
    assert "format version 1" in report.comparison.not_run["tags"]
    assert not report.matches_snapshot and not report.comparison.matches
    assert {k: v[:5] for k, v in bucket_state(client, scratch).items()} == \
        {k: v[:5] for k, v in bucket_state(client, bucket).items()}
    # In place: identical objects keep the tags they have (the snapshot does not know them).
    in_place = engine.restore(repo, record, s3)
    assert in_place.buckets[0].skipped_identical == 4 and in_place.total("tags_corrected") == 0
    assert tags_of(client, bucket, "doc/2") == {"n": "2"}

    # The next backup reuses the version-1 entries and records the tags (version 2).
    outcome = take(repo, s3, [bucket], TODAY)
    assert (outcome.objects_copied, outcome.objects_reused) == (0, 4)
    assert {e.key: e.tags for e in engine.read_snapshot(repo, repo.get("minio", TODAY),
                                                         bucket)} == {
        f"doc/{i}": {"n": str(i)} for i in range(4)}


# -- verification and corruption -----------------------------------------------------------

def test_a_corrupt_or_missing_blob_is_caught_and_healed_by_the_next_backup(
        client, s3, repo, repo_dir, new_bucket):
    bucket = new_bucket()
    for i in range(20):
        put(client, bucket, f"doc/{i}", os.urandom(1000 + i))
    take(repo, s3, [bucket])
    record = repo.get("minio", TODAY)
    entry = next(e for e in engine.read_snapshot(repo, record, bucket) if e.key == "doc/7")
    blob = blob_files(repo_dir)[entry.sha256]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x55
    blob.write_bytes(bytes(data))

    with pytest.raises(IntegrityError, match=rf"corrupt.*{bucket}/doc/7.*minio_backup"):
        engine.verify(repo, record)
    target = new_bucket(create=False)
    with pytest.raises(IntegrityError, match=r"\(corrupt\) \(needed by '.*/doc/7'\)"):
        engine.restore(repo, record, s3, target_bucket=target, prefix="doc/7")
    assert target not in {b["Name"] for b in client.list_buckets()["Buckets"]}

    blob.unlink()
    with pytest.raises(IntegrityError, match=rf"missing.*{bucket}/doc/7"):
        engine.verify(repo, record)
    healed = take(repo, s3, [bucket])
    assert (healed.objects_copied, healed.objects_reused) == (1, 19)
    assert blob.exists()


# -- the restore's pre-flight: a damaged backup changes nothing -----------------------------

def damage(repo_dir: Path, repo: BackupRepository, bucket: str, keys_missing: list[str],
           keys_corrupt: list[str]) -> dict[str, str]:
    """Delete the blobs of ``keys_missing``; flip a byte (same size, other bytes) in those of
    ``keys_corrupt``. Returns key -> the blob's location."""
    record = repo.get("minio", TODAY)
    shas = {e.key: e.sha256 for e in engine.read_snapshot(repo, record, bucket)}
    files = blob_files(repo_dir)
    for key in keys_missing:
        files[shas[key]].unlink()
    for key in keys_corrupt:
        data = bytearray(files[shas[key]].read_bytes())
        data[0] ^= 0xFF
        files[shas[key]].write_bytes(bytes(data))
    return {key: repo.blob_location(shas[key]) for key in (*keys_missing, *keys_corrupt)}


def test_a_missing_or_corrupt_blob_refuses_a_restore_into_a_new_bucket_before_creating_it(
        client, s3, repo, repo_dir, new_bucket):
    bucket = new_bucket()
    for i in range(30):
        put(client, bucket, f"doc/{i:02d}", f"document {i} ".encode() * (i + 1),
            Tagging=f"n={i}")
    put(client, bucket, "doc/copy-of-03", b"document 3 " * 4)  # shares doc/03's blob
    put(client, bucket, "models/large.bin", os.urandom(9 * MB))  # streamed, multipart
    take(repo, s3, [bucket])
    record = repo.get("minio", TODAY)
    missing = [f"doc/{i:02d}" for i in (1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12)]
    where = damage(repo_dir, repo, bucket, missing, ["doc/03", "models/large.bin"])

    target = new_bucket(create=False)
    with pytest.raises(IntegrityError) as refused:
        engine.restore(repo, record, s3, target_bucket=target)
    message = str(refused.value)
    assert "13 blob(s) that the restore would write are missing or damaged" in message
    assert f"{where['doc/01']}: missing (needed by '{bucket}/doc/01')" in message
    assert (f"{where['doc/03']}: content hashes to ") in message
    assert f"(corrupt) (needed by '{bucket}/doc/03', '{bucket}/doc/copy-of-03')" in message
    assert "; and 3 more." in message  # ten named, then a count
    assert f"The target ({target}) was not changed" in message
    assert target not in {b["Name"] for b in client.list_buckets()["Buckets"]}

    # A missing snapshot is refused before the bucket is created too.
    snapshot = repo_dir / "minio" / TODAY / record.backup_id / engine.snapshot_name(bucket)
    snapshot.unlink()
    with pytest.raises(IntegrityError, match=r"snapshot .* is missing.*was not changed"):
        engine.restore(repo, record, s3, target_bucket=target)
    assert target not in {b["Name"] for b in client.list_buckets()["Buckets"]}


def test_a_missing_or_corrupt_blob_refuses_an_in_place_restore_leaving_every_object_alone(
        client, s3, repo, repo_dir, new_bucket):
    bucket = new_bucket()
    fill_tagged(client, bucket)
    for i in range(10):
        put(client, bucket, f"doc/{i}", f"document {i}".encode(), "text/plain", {"i": str(i)},
            Tagging=f"n={i}")
    take(repo, s3, [bucket])
    record = repo.get("minio", TODAY)
    # Since the backup: objects lost or overwritten (the restore would write them), tags
    # changed (it would re-tag), an object added (remove_extra would delete it).
    client.delete_object(Bucket=bucket, Key="doc/1")
    put(client, bucket, "doc/2", b"overwritten", "text/plain")
    put(client, bucket, "doc/3", b"document 3", "text/plain", {"i": "changed"})
    client.delete_object(Bucket=bucket, Key="models/tagged-large.bin")
    set_tags(client, bucket, "tagged/several.pdf", {"project": "changed"})
    put(client, bucket, "extra.txt", b"not in the snapshot", "text/plain")
    where = damage(repo_dir, repo, bucket, ["doc/1", "models/tagged-large.bin"], ["doc/3"])
    before = bucket_state(client, bucket)

    with pytest.raises(IntegrityError) as refused:
        engine.restore(repo, record, s3, remove_extra=True, confirm=bucket)
    message = str(refused.value)
    assert "3 blob(s) that the restore would write are missing or damaged" in message
    assert f"{where['doc/1']}: missing (needed by '{bucket}/doc/1')" in message
    assert (f"{where['models/tagged-large.bin']}: missing (needed by "
            f"'{bucket}/models/tagged-large.bin')") in message
    assert f"(corrupt) (needed by '{bucket}/doc/3')" in message
    assert f"The target ({bucket}) was not changed" in message
    assert bucket_state(client, bucket) == before  # bytes, metadata, headers, tags; extra kept



def test_the_preflight_checks_only_the_blobs_the_restore_will_write(
        client, s3, repo, repo_dir, new_bucket):
    """Objects identical on the target are found by reading it; their blobs are not needed,
    so damage there does not refuse the restore."""
    bucket = new_bucket()
    for i in range(10):
        put(client, bucket, f"doc/{i}", f"document {i}".encode(), "text/plain", Tagging=f"n={i}")
    put(client, bucket, "doc/copy-of-1", b"document 1", "text/plain")  # shares a blob
    take(repo, s3, [bucket])
    record = repo.get("minio", TODAY)
    scratch = new_bucket(create=False)
    first = engine.restore(repo, record, s3, target_bucket=scratch)
    assert (first.preflight.objects_to_write, first.preflight.blobs_checked,
            first.preflight.objects_identical) == (11, 10, 0)
    assert first.preflight.bytes_hashed == sum(len(f"document {i}") for i in range(10))

    damage(repo_dir, repo, bucket, ["doc/5"], ["doc/6"])  # both identical on the target
    client.delete_object(Bucket=scratch, Key="doc/0")      # its blob is intact: written
    set_tags(client, scratch, "doc/7", {"n": "changed"})   # re-tagged: needs no blob
    report = engine.restore(repo, record, s3, target_bucket=scratch)
    assert (report.preflight.objects_to_write, report.preflight.blobs_checked,
            report.preflight.objects_identical) == (1, 1, 10)
    [b] = report.buckets
    assert (b.restored, b.skipped_identical, b.tags_corrected) == (1, 10, 1)
    assert report.matches_snapshot and bucket_state(client, scratch) == bucket_state(client,
                                                                                     bucket)


def test_a_blob_damaged_after_the_preflight_stops_the_copy_and_says_how_far_it_got(
        client, s3, repo, repo_dir, new_bucket, monkeypatch):
    bucket = new_bucket()
    for i in range(10):
        put(client, bucket, f"doc/{i}", f"document {i}".encode(), "text/plain")
    take(repo, s3, [bucket])
    record = repo.get("minio", TODAY)
    preflight = minio_restore._preflight

    def then_damaged(*args, **kwargs):
        checked = preflight(*args, **kwargs)
        damage(repo_dir, repo, bucket, [], ["doc/5"])
        return checked

    monkeypatch.setattr(minio_restore, "_preflight", then_damaged)
    target = new_bucket(create=False)
    with pytest.raises(engine.RestoreAborted) as stopped:
        engine.restore(repo, record, s3, target_bucket=target, workers=1)
    report = stopped.value.report
    [b] = report.buckets
    written = set(bucket_state(client, target))
    assert "doc/5" not in written and {f"doc/{i}" for i in range(5)} <= written
    assert b.restored == len(written) and b.in_snapshot == 10
    assert report.preflight.blobs_checked == 10 and not report.matches_snapshot
    message = str(stopped.value)
    assert f"{bucket}/'doc/5'" in message and "does not match its sha256" in message
    assert f"The target WAS changed: {len(written)} of the 10 objects of {bucket}" in message


def test_large_repositories_rehash_a_rotating_share_covering_every_blob(
        client, s3, repo, new_bucket):
    bucket = new_bucket()
    for i in range(40):
        put(client, bucket, f"doc/{i}", f"document {i}".encode())
    take(repo, s3, [bucket], verify=False)
    record = repo.get("minio", TODAY)
    shas = {e.sha256 for e in engine.read_snapshot(repo, record, bucket)}
    checks = engine.verify(repo, record, full_max_bytes=0, rotation_days=4)
    slot = engine._rotation_slot(TODAY, 4)
    assert checks["blobs_rehashed"] == sum(engine._in_slot(s, 4, slot) for s in shas) < 40
    assert checks["rotation_days"] == 4 and "within 4 days" in checks["rehash_coverage"]
    days = [(utcnow() - timedelta(days=d)).strftime("%Y-%m-%d") for d in range(4)]
    covered = {s for d in days for s in shas if engine._in_slot(s, 4, engine._rotation_slot(d, 4))}
    assert covered == shas
    assert engine.verify(repo, record)["blobs_rehashed"] == 40


# -- retention and garbage collection ------------------------------------------------------

def age(paths, days: float) -> None:
    stamp = time.time() - days * 86400
    for path in paths:
        os.utime(path, (stamp, stamp))


def test_garbage_collection_keeps_every_referenced_blob_and_removes_the_rest(
        client, s3, repo, repo_dir, new_bucket):
    bucket = new_bucket()
    for i in range(10):
        put(client, bucket, f"doc/{i}", f"day one {i}".encode())
    take(repo, s3, [bucket], YESTERDAY)
    client.delete_object(Bucket=bucket, Key="doc/1")
    put(client, bucket, "doc/2", b"day two version")
    put(client, bucket, "doc/10", b"new on day two")
    take(repo, s3, [bucket], TODAY)
    assert len(blob_files(repo_dir)) == 12
    age(blob_files(repo_dir).values(), 3)
    assert engine.collect_garbage(repo).blobs_deleted == 0  # both snapshots reference all

    stale_tmp = repo_dir / "objectstore" / "tmp" / "crashed-backup"
    stale_tmp.parent.mkdir(parents=True)
    stale_tmp.write_bytes(b"partial")
    age([stale_tmp], 3)
    stranger = repo_dir / "objectstore" / "blobs" / "zz" / "README"
    stranger.parent.mkdir()
    stranger.write_text("not ours")
    repo.delete("minio", YESTERDAY, "test: day one expired")
    dry = engine.collect_garbage(repo, dry_run=True)
    assert dry.blobs_deleted == 2 and len(blob_files(repo_dir)) == 12 + 1

    report = engine.collect_garbage(repo)
    assert (report.blobs_deleted, report.temporaries_deleted, report.unknown_files) == (2, 1, 1)
    remaining = {name for name in blob_files(repo_dir) if name != "README"}
    assert remaining == referenced(repo) and len(remaining) == 10
    assert stranger.exists() and not stale_tmp.exists()
    engine.verify(repo, repo.get("minio", TODAY))
    target = new_bucket(create=False)
    engine.restore(repo, repo.get("minio", TODAY), s3, target_bucket=target)
    assert bucket_state(client, target) == bucket_state(client, bucket)


def test_garbage_collection_spares_the_blobs_of_a_backup_still_running(
        client, s3, repo, repo_dir, new_bucket):
    """Content that reappears (an object deleted, then uploaded again) has a blob already,
    old and unreferenced once its snapshot expired: the backup rewrites it, so a collection
    running before that backup commits finds it young and keeps it."""
    bucket = new_bucket()
    put(client, bucket, "a", b"kept all along")
    put(client, bucket, "b", b"deleted, then uploaded again")
    take(repo, s3, [bucket], YESTERDAY)
    client.delete_object(Bucket=bucket, Key="b")
    take(repo, s3, [bucket], TODAY)
    repo.delete("minio", YESTERDAY, "test: expired")
    age(blob_files(repo_dir).values(), 10)
    put(client, bucket, "b", b"deleted, then uploaded again")

    with repo.begin("minio", TODAY, "running") as pending:
        outcome = engine.backup(s3, pending, [bucket], window=WINDOW)
        collected = engine.collect_garbage(repo)  # at the same time, before the commit
        assert collected.blobs_deleted == 0 and collected.blobs_kept_in_grace == 1
        pending.commit(outcome)
    assert (outcome.objects_copied, outcome.objects_reused) == (1, 1)
    engine.verify(repo, repo.get("minio", TODAY))


def test_snapshots_near_the_end_of_the_window_are_not_reused(client, s3, repo, new_bucket):
    """Retention could delete such a snapshot (and collect its blobs) during the backup."""
    bucket = new_bucket()
    put(client, bucket, "x", b"x")
    old = (utcnow() - timedelta(days=13)).strftime("%Y-%m-%d")
    take(repo, s3, [bucket], old, verify=False)
    outcome = take(repo, s3, [bucket], TODAY, verify=False)
    assert outcome.reuse_source is None and outcome.objects_copied == 1


def test_garbage_collection_deletes_nothing_when_a_snapshot_is_unreadable(
        client, s3, repo, repo_dir, new_bucket):
    bucket = new_bucket()
    put(client, bucket, "a", b"a")
    take(repo, s3, [bucket], YESTERDAY)
    put(client, bucket, "a", b"a2")
    take(repo, s3, [bucket], TODAY)
    age(blob_files(repo_dir).values(), 10)
    record = repo.get("minio", TODAY)
    snapshot = Path(record.location) / engine.snapshot_name(bucket)
    snapshot.write_bytes(snapshot.read_bytes()[:-5])
    repo.delete("minio", YESTERDAY, "test")
    with pytest.raises(IntegrityError, match=f"refused, nothing deleted.*{TODAY}"):
        engine.collect_garbage(repo)
    assert len(blob_files(repo_dir)) == 2


def test_a_killed_backup_leaves_the_previous_snapshot_intact_and_no_debris_after_gc(
        client, s3, repo, repo_dir, new_bucket, monkeypatch):
    bucket = new_bucket()

    def fill(version: int) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: put(client, bucket, f"doc/{i:04d}",
                                        f"v{version} {i} ".encode() * 2000), range(400)))

    fill(1)
    take(repo, s3, [bucket])
    first = repo.get("minio", TODAY)
    fill(2)  # the doomed run has 400 objects to download
    monkeypatch.setenv("RAG_S3_ACCESS_KEY", s3.access_key)
    kill_backup_while_writing(
        store="minio", repo_dir=repo_dir, partition=TODAY, password=s3.secret_key,
        server=f"engine.S3Endpoint({s3.url!r}, os.environ['RAG_S3_ACCESS_KEY'], "
               f"os.environ['PW'], {s3.region!r})",
        backup_args=f", [{bucket!r}], window=__import__('datetime').timedelta(days=14)")
    after = repo.get("minio", TODAY)
    assert after.backup_id == first.backup_id and after.verified
    engine.verify(repo, after)

    second = take(repo, s3, [bucket])
    assert second.objects_copied == 400
    # The dead run's directory is not the next commit's to remove (it only removes the backup
    # it replaces); retention collects it once stale.
    assert [p for p in repo_dir.rglob("*") if ".tmp-" in p.name]
    gone = repo.collect_abandoned_backups("minio", older_than=timedelta(0))
    assert gone and all("abandoned" in g.kind for g in gone)
    engine.collect_garbage(repo, grace=timedelta(0))
    assert set(blob_files(repo_dir)) == referenced(repo)
    assert [p for p in repo_dir.rglob("*") if ".tmp-" in p.name] == []
    assert list(repo.backend.list_files(engine.TMP_PREFIX, include_temporary=True)) == []


# -- an S3 repository, and refusals ----------------------------------------------------------

def test_repository_on_s3_and_its_bucket_is_never_backed_up_or_restored_into(
        client, s3, new_bucket):
    holder, source = new_bucket(), new_bucket()
    repo = BackupRepository(S3Backend(client, holder, prefix="rag-backup"))
    put(client, source, "big/model.bin", os.urandom(17 * MB), "application/octet-stream",
        {"k": "v"})
    put(client, source, "small.txt", b"small", "text/plain")
    before = bucket_state(client, source)
    take(repo, s3, [source], YESTERDAY)
    put(client, source, "small.txt", b"small, changed", "text/plain")
    take(repo, s3, [source], TODAY)
    blobs = list(repo.backend.list_files(engine.BLOB_PREFIX))
    assert len(blobs) == 3 and all(engine.blob_sha(b.key) for b in blobs)
    assert list(repo.backend.list_files(engine.TMP_PREFIX)) == []

    with pytest.raises(InvalidRequest, match=f"{holder}.*holds the backup repository"), \
            repo.begin("minio", TODAY, "t") as pending:
        engine.backup(s3, pending, [source, holder], window=WINDOW)
    with pytest.raises(InvalidRequest, match="holds the backup repository"):
        engine.restore(repo, repo.get("minio", TODAY), s3, target_bucket=holder)

    target = new_bucket(create=False)
    engine.restore(repo, repo.get("minio", YESTERDAY), s3, target_bucket=target)
    assert bucket_state(client, target) == before
    repo.delete("minio", YESTERDAY, "test")
    report = engine.collect_garbage(repo, grace=timedelta(0))
    assert report.blobs_deleted == 1
    assert {engine.blob_sha(b.key) for b in repo.backend.list_files(engine.BLOB_PREFIX)} \
        == referenced(repo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def strict_s3():
    """A second S3 server that, unlike the stack's, checks credentials (it knows none)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=2)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    yield url
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_wrong_credentials_unreachable_server_and_missing_bucket_are_clear(
        s3, repo, strict_s3, new_bucket):
    secret = "wrong-secret-" + uuid.uuid4().hex
    wrong = engine.S3Endpoint(strict_s3, "AKIAWRONGKEY", secret)
    with pytest.raises(CredentialsRejected, match="RAG_S3_ACCESS_KEY") as refused, \
            repo.begin("minio", TODAY, "t") as pending:
        engine.backup(wrong, pending, ["documents"], window=WINDOW)
    assert secret not in str(refused.value) and secret not in repr(wrong)

    gone = engine.S3Endpoint(f"http://127.0.0.1:{free_port()}", "k", secret, max_attempts=1,
                             connect_timeout_s=2)
    with pytest.raises(StoreUnreachable, match=f"{gone.url}.* is unreachable") as unreachable, \
            repo.begin("minio", TODAY, "t") as pending:
        engine.backup(gone, pending, ["documents"], window=WINDOW)
    assert secret not in str(unreachable.value)

    missing = new_bucket(create=False)
    with pytest.raises(InvalidRequest, match=f"{missing}.*does not exist"), \
            repo.begin("minio", TODAY, "t") as pending:
        engine.backup(s3, pending, [missing], window=WINDOW)
    assert repo.get("minio", TODAY) is None
    assert repo.backend.list_children(f"minio/{TODAY}") == []


# -- through Dagster -----------------------------------------------------------------------

def resources(s3: engine.S3Endpoint, repo_dir: Path, buckets: list[str]) -> dict:
    return {"repository": BackupRepositoryResource(location=str(repo_dir)),
            "minio": MinioResource(endpoint=s3.url, access_key=s3.access_key,
                                              secret_key=s3.secret_key, region=s3.region,
                                              buckets=",".join(buckets))}


def test_assets_and_restore_job(client, s3, repo, repo_dir, new_bucket, stack_env):
    docs, models = new_bucket(), new_bucket()
    fill_varied(client, docs)
    put(client, models, "base/config.json", b'{"dim": 384}', "application/json")
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [minio_defs.minio_backup, minio_defs.minio_backup_verified, minio_defs.minio_retention],
        partition_key=TODAY, instance=instance,
        resources=resources(s3, repo_dir, [docs, models]))
    assert result.success
    [mat] = result.asset_materializations_for_node("minio_backup")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["objects"] == 8 and meta["objects_copied"] == 8 and meta["objects_reused"] == 0
    assert meta["bytes"] == meta["bytes_copied"] > 15 * MB and meta["duration_s"] > 0
    assert repo.get("minio", TODAY).verified
    [verified] = result.asset_materializations_for_node("minio_backup_verified")
    assert verified.metadata["blobs_rehashed"].value == 8
    [retained] = result.asset_materializations_for_node("minio_retention")
    assert retained.metadata["blobs_collected"].value == 0
    assert retained.metadata["backups_kept"].value == 1
    for value in (*mat.metadata.values(), *retained.metadata.values()):
        assert stack_env["RAG_S3_SECRET_KEY"] not in str(value.value)
    assert stack_env["RAG_S3_SECRET_KEY"].encode() not in (
        repo_dir / "minio" / TODAY / "manifest.json").read_bytes()

    before = bucket_state(client, docs)
    empty_bucket(client, docs)
    target = new_bucket(create=False)
    config = minio_defs.RestoreMinioConfig(buckets=[docs])
    run = minio_defs.restore_minio_job.execute_in_process(
        run_config=dg.RunConfig(ops={"restore_minio": config}),
        resources=resources(s3, repo_dir, [docs, models]), instance=instance)
    assert run.success
    out = run.output_for_node("restore_minio")
    assert out["matches_snapshot"] and out["buckets"][docs]["restored"] == 7
    assert out["comparison"]["compared"]["sha256"] == 7 and out["comparison"]["matches"]
    assert bucket_state(client, docs) == before

    config = minio_defs.RestoreMinioConfig(buckets=[models], target_bucket=target)
    run = minio_defs.restore_minio_job.execute_in_process(
        run_config=dg.RunConfig(ops={"restore_minio": config}),
        resources=resources(s3, repo_dir, [docs, models]), instance=instance)
    assert run.success and run.output_for_node("restore_minio")["buckets"][models] == {
        "target": target, "in_snapshot": 1, "restored": 1, "skipped_identical": 0,
        "tags_corrected": 0, "removed": 0, "bytes_restored": 12, "missing_after": 0}

    refused = minio_defs.restore_minio_job.execute_in_process(
        run_config=dg.RunConfig(ops={"restore_minio": minio_defs.RestoreMinioConfig(
            buckets=[docs], remove_extra=True)}),
        resources=resources(s3, repo_dir, [docs, models]), instance=instance,
        raise_on_error=False)
    assert not refused.success
    assert f"set confirm to '{docs}'" in str(refused.failure_data_for_node("restore_minio").error)

    fields = (minio_defs.restore_minio_job.graph.node_named("restore_minio").definition
              .config_schema.config_type.fields)
    assert all(field.description for field in fields.values())


def restore_output_metadata(run) -> dict:
    [event] = [e for e in run.events_for_node("restore_minio") if e.is_successful_output]
    return {k: v.value for k, v in event.step_output_data.metadata.items()}


def test_the_restore_job_reports_the_comparison_and_refuses_a_difference_unless_accepted(
        client, s3, repo, repo_dir, new_bucket, monkeypatch):
    bucket = new_bucket()
    fill_tagged(client, bucket)
    take(repo, s3, [bucket])
    scratch = new_bucket(create=False)
    instance = dg.DagsterInstance.ephemeral()

    def run_job(**config):
        return minio_defs.restore_minio_job.execute_in_process(
            run_config=dg.RunConfig(ops={"restore_minio": minio_defs.RestoreMinioConfig(
                buckets=[bucket], target_bucket=scratch, **config)}),
            resources=resources(s3, repo_dir, [bucket]), instance=instance,
            raise_on_error=False)

    clean = run_job()
    assert clean.success
    meta = restore_output_metadata(clean)
    assert meta["matches_snapshot"] is True and meta["differences"] == 0
    assert meta["compared_tags"] == meta["compared_sha256"] == meta["compared_objects"] == 5
    assert "not_compared" not in meta
    assert meta["preflight_blobs_checked"] == 5 and meta["preflight_objects_identical"] == 0
    assert meta["preflight_bytes_hashed"] == sum(
        o["Size"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert meta["preflight_s"] >= 0
    assert clean.output_for_node("restore_minio")["preflight"]["blobs_checked"] == 5

    compare = minio_restore._compare

    def with_a_concurrent_writer(*args, **kwargs):
        client.copy_object(Bucket=scratch, Key="untagged.txt", CopySource={
            "Bucket": scratch, "Key": "untagged.txt"}, MetadataDirective="REPLACE",
            ContentType="text/plain", Metadata={"added": "by someone else"})
        return compare(*args, **kwargs)

    monkeypatch.setattr(minio_restore, "_compare", with_a_concurrent_writer)
    refused = run_job()
    assert not refused.success
    error = str(refused.failure_data_for_node("restore_minio").error)
    assert f"{scratch}/untagged.txt: metadata added is 'by someone else'" in error
    assert "accept_differences" in error

    accepted = run_job(accept_differences=True)
    assert accepted.success
    meta = restore_output_metadata(accepted)
    assert meta["matches_snapshot"] is False and meta["differences"] == 1
    assert f"| {scratch}/untagged.txt | metadata added |" in meta["differences_found"]
    out = accepted.output_for_node("restore_minio")
    assert out["comparison"]["differences"][0]["item"] == f"{scratch}/untagged.txt"
