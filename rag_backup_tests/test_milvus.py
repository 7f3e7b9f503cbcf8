"""Milvus end to end against the stack's real Milvus 2.3.5 server: engine, assets, restore job.

Every test collection has a unique name and is dropped afterwards; the seeded collections are
only read. Restored rows are compared with the originals by reading both sides with
``query_iterator`` directly, independent of the engine.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pymilvus import DataType, MilvusClient

from rag_backup.defs import milvus as milvus_defs
from rag_backup.defs.resources import BackupRepositoryResource, MilvusResource
from rag_backup.engines import milvus as engine
from rag_backup.engines.milvus import staging
from rag_backup.engines.milvus.artifacts import read_description
from rag_backup.engines.milvus.insert import Inserter
from rag_backup.engines.milvus.parquet import iter_parquet
from rag_backup.engines.milvus.probes import nearest_still_there, probe_search
from rag_backup.errors import (
    ConfirmationRequired,
    DamagedBackup,
    IntegrityError,
    InvalidRequest,
    StoreUnreachable,
)
from rag_backup.repository import (
    BackupOutcome,
    BackupRecord,
    BackupRepository,
    FilesystemBackend,
    S3Backend,
)
from rag_backup.repository.manifest import utcnow
from rag_backup_tests.conftest import take_backup as committed
from rag_backup_tests.killing import kill_backup_while_writing

DAY = utcnow().strftime("%Y-%m-%d")
BIG_ROWS = 50_000
BIG_DIM = 32
ROWS_PER_FILE = 6000
BIG_PARTITIONS = ("p_hi", "p_en", "p_mix")
HINDI = ("कृषि मंत्रालय", "स्वास्थ्य एवं परिवार कल्याण", "शिक्षा", "जल जीवन मिशन", "रेल टिकट")


def big_partition(i: int) -> str:
    return "_default" if i % 10 == 9 else BIG_PARTITIONS[i % 3]


BIG_COUNTS = Counter(big_partition(i) for i in range(BIG_ROWS))


def unique(prefix: str) -> str:
    return f"t_{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def ms(stack, stack_env) -> engine.MilvusServer:
    return engine.MilvusServer(stack_env["RAG_MILVUS_URI"], stack_env["RAG_MILVUS_TOKEN"],
                               storage_root=stack_env["RAG_MILVUS_STORAGE_ROOT"])


@pytest.fixture(scope="module")
def client(ms) -> MilvusClient:
    c = MilvusClient(uri=ms.uri, token=ms.token, timeout=60)
    yield c
    c.close()


@pytest.fixture
def dropped(client):
    """Names to drop after the test (restored copies)."""
    names: list[str] = []
    yield names
    for name in names:
        if client.has_collection(name):
            client.drop_collection(name)


def finish(client: MilvusClient, name: str, index, load: bool = True) -> None:
    client.flush(name)
    client.create_index(name, index)
    if load:
        client.load_collection(name)


def make_big(client: MilvusClient) -> tuple[str, object, bool]:
    """50,000 rows in four partitions: 32-d vectors, Hindi VARCHAR, JSON objects (nested, empty,
    Hindi, 64-bit ints, nulls), a VARCHAR array, dynamic fields on some rows; HNSW, loaded."""
    name = unique("big")
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True,
                                        description="बड़ा संग्रह: big collection")
    schema.add_field("id", DataType.INT64, is_primary=True, description="documents.id")
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=BIG_DIM)
    schema.add_field("text", DataType.VARCHAR, max_length=512)
    schema.add_field("meta", DataType.JSON)
    schema.add_field("score", DataType.DOUBLE)
    schema.add_field("tags", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=4,
                     max_length=32)
    client.create_collection(name, schema=schema, consistency_level="Strong")
    for p in BIG_PARTITIONS:
        client.create_partition(name, p)
    rng = random.Random(4)
    vectors = np.random.default_rng(4).standard_normal((BIG_ROWS, BIG_DIM), dtype=np.float32)
    batch: dict[str, list] = {}
    for i in range(BIG_ROWS):
        # Milvus 2.3 takes JSON objects only; a str is sent as JSON text verbatim.
        meta = ({"ministry": HINDI[i % 5], "year": 2019 + i % 6, "pages": [1, i % 40],
                 "ratio": i / 7, "nested": {"ok": i % 2 == 0, "none": None}, "big": 2**60 + i}
                if i % 50 > 1 else "{}" if i % 50 == 0 else f'{{"only": "केवल पाठ {i}"}}')
        row = {"id": 1_000_000 + 3 * i, "embedding": vectors[i].tolist(),
               "text": f"{HINDI[i % 5]} दस्तावेज़ {i}", "meta": meta, "score": rng.random(),
               "tags": [HINDI[i % 5][:8], f"tag{i % 3}"][: i % 3]}
        if i % 3 == 0:
            row["source"] = f"crawler-{i % 7}"
        if i % 5 == 0:
            row["page"] = i % 100
        partition = big_partition(i)
        batch.setdefault(partition, []).append(row)
        if len(batch[partition]) == 5000:
            client.insert(name, batch.pop(partition), partition_name=partition)
    for partition, rows in batch.items():
        client.insert(name, rows, partition_name=partition)
    index = client.prepare_index_params()
    index.add_index(field_name="embedding", index_type="HNSW", metric_type="COSINE",
                    params={"M": 8, "efConstruction": 64})
    return name, index, True


def make_auto(client: MilvusClient) -> tuple[str, object, bool]:
    """An auto_id collection with a dynamic field in two partitions; IVF_FLAT, loaded."""
    name = unique("auto")
    schema = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=True)
    schema.add_field("pk", DataType.INT64, is_primary=True, auto_id=True)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=8)
    schema.add_field("title", DataType.VARCHAR, max_length=128)
    client.create_collection(name, schema=schema, consistency_level="Bounded")
    client.create_partition(name, "recent")
    rng = np.random.default_rng(5)
    for partition in ("_default", "recent"):
        client.insert(name, [{"vec": rng.standard_normal(8).tolist(),
                              "title": f"{HINDI[i % 5]} {i}", "lang": "hi" if i % 2 else "en"}
                             for i in range(1500)], partition_name=partition)
    index = client.prepare_index_params()
    index.add_index(field_name="vec", index_type="IVF_FLAT", metric_type="L2",
                    params={"nlist": 16})
    return name, index, True


def make_kinds(client: MilvusClient) -> tuple[str, object, bool]:
    """Every other type: a VARCHAR primary key, a partition key, a binary vector, every scalar,
    an INT64 array, a TTL property, a scalar index; NOT loaded (the backup loads and releases)."""
    name = unique("kinds")
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("tenant", DataType.VARCHAR, max_length=32, is_partition_key=True)
    schema.add_field("bits", DataType.BINARY_VECTOR, dim=64)
    for field_name, dtype in (("b", DataType.BOOL), ("i8", DataType.INT8),
                              ("i16", DataType.INT16), ("i32", DataType.INT32),
                              ("i64", DataType.INT64), ("f", DataType.FLOAT),
                              ("d", DataType.DOUBLE)):
        schema.add_field(field_name, dtype)
    schema.add_field("nums", DataType.ARRAY, element_type=DataType.INT64, max_capacity=5)
    client.create_collection(name, schema=schema, consistency_level="Session", num_partitions=4,
                             properties={"collection.ttl.seconds": 31536000})
    rng = random.Random(6)
    client.insert(name, [{"key": f"क-{i}", "tenant": f"t{i % 5}", "bits": rng.randbytes(8),
                          "b": i % 2 == 0, "i8": -128 + i % 256, "i16": -i, "i32": i * 1000,
                          "i64": 2**62 + i, "f": rng.random(), "d": rng.random() * 1e300,
                          "nums": list(range(i % 6))} for i in range(400)])
    index = client.prepare_index_params()
    index.add_index(field_name="bits", index_type="BIN_IVF_FLAT", metric_type="HAMMING",
                    params={"nlist": 8})
    index.add_index(field_name="tenant", index_type="Trie", index_name="tenant_trie")
    return name, index, False


@pytest.fixture(scope="module")
def made(client) -> dict[str, str]:
    """The three test collections; flushing, indexing and loading (server timers, mostly) run
    for all three at once."""
    made: dict[str, tuple[str, object, bool]] = {}
    try:
        for kind, make in (("big", make_big), ("auto", make_auto), ("kinds", make_kinds)):
            made[kind] = make(client)
        with ThreadPoolExecutor(max_workers=3) as pool:
            for future in [pool.submit(finish, client, *spec) for spec in made.values()]:
                future.result()
        yield {kind: spec[0] for kind, spec in made.items()}
    finally:
        for name, _, _ in made.values():
            client.drop_collection(name)


@pytest.fixture(scope="module")
def big(made) -> str:
    return made["big"]


@pytest.fixture(scope="module")
def auto(made) -> str:
    return made["auto"]


@pytest.fixture(scope="module")
def kinds(made) -> str:
    return made["kinds"]


def rows_of(client: MilvusClient, name: str) -> dict:
    """Every row (every field, dynamic ones included), read with plain query_iterator."""
    pk = next(f["name"] for f in client.describe_collection(name)["fields"] if f.get("is_primary"))
    loaded = client.get_load_state(name)["state"].name == "Loaded"
    if not loaded:
        client.load_collection(name)
    iterator = client.query_iterator(name, batch_size=5000, output_fields=["*"])
    out = {}
    while batch := iterator.next():
        for row in batch:
            out[row[pk]] = row
    iterator.close()
    if not loaded:
        client.release_collection(name)
    return out


def shape(client: MilvusClient, name: str) -> dict:
    """The collection's schema, partitions and indexes, minus ids and names."""
    info = client.describe_collection(name)
    indexes = sorted((client.describe_index(name, i) for i in client.list_indexes(name)),
                     key=lambda i: i["index_name"])
    for index in indexes:
        for volatile in ("total_rows", "indexed_rows", "pending_index_rows", "state"):
            index.pop(volatile, None)
    return {"fields": [{k: v for k, v in f.items() if k != "field_id"} for f in info["fields"]],
            "description": info["description"], "auto_id": info["auto_id"],
            "dynamic": info["enable_dynamic_field"], "shards": info["num_shards"],
            "consistency": info["consistency_level_name"], "properties": info["properties"],
            "num_partitions": info["num_partitions"],
            "partitions": sorted(client.list_partitions(name)), "indexes": indexes}


def take_backup(repo: BackupRepository, ms: engine.MilvusServer, collections: list[str],
                partition: str = DAY, verify: bool = True, **kwargs):
    return committed(
        repo, "milvus", partition,
        lambda pending: engine.backup(ms, pending, collections=collections, **kwargs),
        (lambda record: engine.verify(repo, record)) if verify else None)


@pytest.fixture(scope="module")
def originals(client, big, kinds, auto) -> dict:
    """Every row of the three collections as they were backed up."""
    return {name: rows_of(client, name) for name in (big, kinds, auto)}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, ms, originals, big, kinds, auto):
    """One verified backup of the three collections (a new file every 6,000 rows, batches of
    3,000), taken once; tests that damage it work on a copy (``copied``)."""
    directory = tmp_path_factory.mktemp("milvus-shared-repo")
    repo = BackupRepository(FilesystemBackend(directory))
    outcome, record = take_backup(repo, ms, [big, kinds, auto], rows_per_file=ROWS_PER_FILE,
                                  batch_rows=3000)
    return directory, outcome, record


@pytest.fixture
def copied(shared, repo, repo_dir) -> BackupRecord:
    """The shared backup, copied into this test's own repository."""
    shutil.copytree(shared[0], repo_dir, dirs_exist_ok=True)
    return repo.get("milvus", DAY)


def test_backup_streams_every_collection_into_rolling_parquet_files(
        client, shared, big, kinds, auto):
    directory, outcome, record = shared
    fp = outcome.fingerprint["collections"]
    assert fp[big]["rows"] == fp[big]["rows_before"] == fp[big]["rows_after"] == BIG_ROWS
    typed = engine.fingerprint_of(record)
    assert typed.to_dict() == outcome.fingerprint == record.manifest.fingerprint
    assert typed == engine.fingerprint_of(outcome) and typed.consistent
    assert typed.collections[big].partitions == dict(BIG_COUNTS)
    artifact = record.manifest.artifacts[0]
    assert BackupRepository(FilesystemBackend(directory)).local_artifact_path(
        record, artifact) == Path(record.location) / artifact.path
    assert outcome.fingerprint["consistent"] and outcome.server_version == "v2.3.5-lite"
    assert outcome.fingerprint["rows"] == BIG_ROWS + 400 + 3000
    assert fp[big]["partitions"] == dict(BIG_COUNTS)
    assert fp[kinds]["partitions"] == {engine.ALL_PARTITIONS: 400}
    assert fp[auto]["partitions"] == {"_default": 1500, "recent": 1500} and fp[auto]["auto_id"]
    p_en = sorted(f for f in fp[big]["files"] if "/p_en/" in f)
    assert len(p_en) == math.ceil(BIG_COUNTS["p_en"] / ROWS_PER_FILE) == 3
    first = pq.ParquetFile(Path(record.location) / p_en[0]).metadata
    assert first.num_rows == ROWS_PER_FILE and first.num_row_groups == 2  # a group per batch
    assert client.get_load_state(kinds)["state"].name == "NotLoad"  # loaded, then released
    description = json.loads((Path(record.location) / f"{big}/schema.json").read_text())
    assert description["description"] == "बड़ा संग्रह: big collection"
    assert description["indexes"][0]["params"] == {"M": "8", "efConstruction": "64"}
    assert len(description["probes"]["queries"]) == engine.PROBES
    checks = engine.verify(BackupRepository(FilesystemBackend(directory)), record)
    assert checks["rows"] == BIG_ROWS + 3400 and checks["collections"] == 3


def test_round_trip_keeps_every_row_field_vector_partition_and_index(
        client, ms, shared, originals, big, kinds, dropped):
    directory, _, record = shared
    targets = {big: f"{big}_r", kinds: f"{kinds}_r"}
    dropped.extend(targets.values())
    lines: list[str] = []
    report = engine.restore(BackupRepository(FilesystemBackend(directory)), record, ms,
                            targets=targets, log=lines.append)

    assert report.matches_manifest and report.rows == BIG_ROWS + 400
    # every type, dynamic fields and a partition key went column by column, vectors as bytes
    assert sorted(line.split(": ")[1] for line in lines if "inserting by" in line) == [
        "inserting by columns"] * 2
    for source, target in targets.items():
        assert rows_of(client, target) == originals[source]
        assert shape(client, target) == shape(client, source)
        assert client.get_load_state(target)["state"].name == "Loaded"
    [restored_big] = [c for c in report.collections if c.source == big]
    assert restored_big.probes == engine.PROBES and restored_big.probes_top1 == engine.PROBES


def test_a_client_without_the_insert_stub_inserts_rows_the_same(
        client, ms, shared, originals, kinds, dropped):
    """The fallback of ``engines.milvus.insert``: a pymilvus without the stub it packs requests
    for gets rows through ``MilvusClient.insert``, with the same result."""
    directory, _, record = shared
    repo = BackupRepository(FilesystemBackend(directory))
    desc = read_description(repo, record, kinds)
    target = f"{kinds}_rows"
    dropped.append(target)
    staging._create(client, ms, target, desc)

    class PublicOnly:  # MilvusClient's public insert, nothing private
        insert = staticmethod(client.insert)

    inserter = Inserter(PublicOnly(), desc, target, drop_primary=False,  # type: ignore[arg-type]
                        timeout=60)
    assert inserter.mode.startswith("rows (this pymilvus has no insert stub")
    for path in engine.fingerprint_of(record).collections[kinds].files:
        for batch in iter_parquet(Path(record.location) / path, engine.arrow_schema(desc), 150,
                                  path):
            assert inserter.send(inserter.prepare(batch, None), 60) == batch.num_rows
    client.flush(target)
    assert rows_of(client, target) == originals[kinds]


def test_a_probe_ranked_otherwise_is_settled_by_the_source_nearest_row_and_its_distance(
        client, ms, shared, big):
    """An index built anew may rank another row first; the probe then holds if the source's
    nearest row is in the copy at the distance the source reported, and fails if it is not."""
    directory, _, record = shared
    probes = read_description(BackupRepository(FilesystemBackend(directory)), record, big)[
        "probes"]
    if client.get_load_state(big)["state"].name != "Loaded":
        client.load_collection(big)
    vector = probes["queries"][0]["vector"]
    ids, distances = probe_search(client, ms, big, probes, vector)
    # as if the source's index had ranked the 4th row first
    ranked_otherwise = {"vector": vector, "ids": [ids[3]], "distances": [distances[3]]}
    assert ids[0] != ids[3] and abs(distances[0] - distances[3]) > 1e-5
    assert nearest_still_there(client, ms, big, probes, ranked_otherwise)
    for damaged in ({**ranked_otherwise, "distances": [distances[3] - 0.01]},  # vector changed
                    {**ranked_otherwise, "ids": [max(ids) + 10_000_000]}):  # row missing
        assert not nearest_still_there(client, ms, big, probes, damaged)


def test_auto_id_collection_keeps_its_ids_and_its_auto_id(
        client, ms, shared, originals, auto, dropped):
    directory, _, record = shared
    target = f"{auto}_r"
    dropped.append(target)

    report = engine.restore(BackupRepository(FilesystemBackend(directory)), record, ms,
                            targets={auto: target})

    assert report.collections[0].auto_id_mode == "import" and report.matches_manifest
    assert rows_of(client, target) == originals[auto]
    assert shape(client, target) == shape(client, auto)
    new_id = client.insert(target, [{"vec": [0.5] * 8, "title": "नया"}])["ids"][0]
    assert new_id not in originals[auto]  # the server still generates ids


def test_auto_id_import_without_or_with_a_wrong_storage_root_fails_clearly(
        client, ms, shared, auto):
    directory, _, record = shared
    repo = BackupRepository(FilesystemBackend(directory))
    target = f"{auto}_n"
    no_root = engine.MilvusServer(ms.uri, ms.token)
    with pytest.raises(InvalidRequest, match="storage root .*explicit_ids"):
        engine.restore(repo, record, no_root, targets={auto: target})
    wrong = engine.MilvusServer(ms.uri, ms.token, storage_root="/nonexistent/milvus")
    with pytest.raises(IntegrityError, match="imported 0 rows.*storage root is probably wrong"):
        engine.restore(repo, record, wrong, targets={auto: target})
    leftovers = [c for c in client.list_collections() if c.startswith(target)]
    assert leftovers == []  # staging and loader collections were dropped


def test_in_place_restore_needs_confirmation_and_replaces_after_checking(
        client, ms, repo, dropped):
    name = unique("inplace")
    dropped.append(name)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    client.create_collection(name, schema=schema, consistency_level="Strong")
    client.insert(name, [{"id": i, "v": [i, 1.0, 2.0, 3.0]} for i in range(300)])
    index = client.prepare_index_params()
    index.add_index(field_name="v", index_type="FLAT", metric_type="L2")
    finish(client, name, index)
    client.create_alias(name, f"{name}_alias")
    before = rows_of(client, name)
    _, record = take_backup(repo, ms, [name])
    client.delete(name, ids=list(range(100)))
    client.insert(name, [{"id": 10_000, "v": [0.0, 0.0, 0.0, 1.0]}])
    damaged = rows_of(client, name)

    with pytest.raises(ConfirmationRequired, match=f"set confirm to '{name}'"):
        engine.restore(repo, record, ms, targets={name: name})
    assert rows_of(client, name) == damaged

    report = engine.restore(repo, record, ms, targets={name: name}, confirm=[name])
    assert report.collections[0].replaced_existing
    assert rows_of(client, name) == before
    assert client.describe_collection(name)["aliases"] == [f"{name}_alias"]
    client.drop_alias(f"{name}_alias")


def test_corrupt_parquet_is_caught_before_anything_is_restored(client, ms, repo, kinds,
                                                               copied):
    record = copied
    path = next((Path(record.location) / kinds).rglob("*.parquet"))
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    relative = path.relative_to(record.location).as_posix()
    with pytest.raises(IntegrityError, match=f"{relative} sha256 .* does not match"):
        engine.verify(repo, record)
    with pytest.raises(IntegrityError, match="sha256"):
        engine.restore(repo, record, ms, targets={kinds: f"{kinds}_c"}, confirm=[f"{kinds}_c"])
    assert not client.has_collection(f"{kinds}_c")

    # Damaged before it was stored (the checksum matches): reading it is what catches it.
    partition = "2026-11-23"
    description = (Path(record.location) / f"{kinds}/schema.json").read_bytes()
    with repo.begin("milvus", partition, "t") as pending:
        with pending.artifact(f"{kinds}/schema.json") as out:
            out.write(description)
        with pending.artifact(f"{kinds}/_all/part-00000.parquet") as out:
            out.write(original[: len(original) // 2] + original[-8:])  # footer cut off
        entry = {**record.manifest.fingerprint["collections"][kinds],
                 "files": {f"{kinds}/_all/part-00000.parquet": 400}}
        pending.commit(BackupOutcome({"collections": {kinds: entry}}, {}, "v2.3.5-lite"))
    with pytest.raises(IntegrityError, match=f"{kinds}/_all/part-00000.parquet is not a "
                                             "readable Parquet file"):
        engine.verify(repo, repo.get("milvus", partition))


def test_a_parquet_file_of_another_schema_or_row_count_fails_verification(repo, kinds,
                                                                          copied):
    record = copied
    entry = record.manifest.fingerprint["collections"][kinds]
    description = (Path(record.location) / f"{kinds}/schema.json").read_bytes()
    other = pa.table({"key": ["a"], "tenant": ["t"]})
    for partition, table, rows, message in (
            ("2026-11-21", other, 1, "has the schema"),
            ("2026-11-22", pq.read_table(next((Path(record.location) / kinds).rglob("*.parquet"))),
             7,
             "has 400 rows, the manifest says 7")):
        with repo.begin("milvus", partition, "t") as pending:
            with pending.artifact(f"{kinds}/schema.json") as out:
                out.write(description)
            with pending.artifact(f"{kinds}/_all/part-00000.parquet") as out:
                sink = pa.BufferOutputStream()
                pq.write_table(table, sink)
                out.write(sink.getvalue().to_pybytes())
            pending.commit(BackupOutcome({"collections": {kinds: {
                **entry, "rows": rows, "files": {f"{kinds}/_all/part-00000.parquet": rows}}}},
                {}, "v2.3.5-lite"))
        with pytest.raises(IntegrityError, match=message):
            engine.verify(repo, repo.get("milvus", partition))


def test_an_s3_repository_takes_and_verifies_the_same_backup(stack_env, ms, auto):
    s3 = boto3.client("s3", endpoint_url=stack_env["RAG_S3_ENDPOINT"],
                      aws_access_key_id=stack_env["RAG_S3_ACCESS_KEY"],
                      aws_secret_access_key=stack_env["RAG_S3_SECRET_KEY"],
                      region_name=stack_env.get("RAG_S3_REGION", "us-east-1"))
    bucket = f"milvus-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    repo = BackupRepository(S3Backend(s3, bucket, prefix="rag-backup"))
    outcome, record = take_backup(repo, ms, [auto], rows_per_file=1000, batch_rows=500)
    assert record.location.startswith(f"s3://{bucket}/") and record.verified
    assert len(outcome.collections[auto].files) == 4  # 2 partitions x 1,500 rows / 1,000
    assert repo.local_artifact_path(record, record.manifest.artifacts[0]) is None
    assert engine.verify(repo, record)["rows"] == 3000


def test_a_killed_backup_leaves_the_previous_backup_intact(ms, repo, repo_dir, big, copied):
    kill_backup_while_writing(
        store="milvus", repo_dir=repo_dir, partition=DAY, password=ms.token,
        server=f"engine.MilvusServer({ms.uri!r}, os.environ['PW'])",
        backup_args=f", collections=[{big!r}], batch_rows=1000")
    after = repo.get("milvus", DAY)
    assert after.backup_id == copied.backup_id and after.verified
    assert engine.verify(repo, after)["rows"] == BIG_ROWS + 3400


def test_a_description_that_cannot_be_recreated_fails_offline():
    desc = {"format": 1, "name": "c", "description": "", "auto_id": False,
            "enable_dynamic_field": False, "partition_key": None, "partitions": ["_default"],
            "fields": [{"name": "id", "type": "INT64", "description": "", "is_primary": True,
                        "auto_id": False, "is_partition_key": False, "params": {},
                        "element_type": None},
                       {"name": "v", "type": "FLOAT_VECTOR", "description": "",
                        "is_primary": False, "auto_id": False, "is_partition_key": False,
                        "params": {"dim": 8}, "element_type": None}],
            "indexes": [{"field_name": "v", "index_name": "v", "index_type": "HNSW",
                         "metric_type": "L2", "params": {"M": "8"}}]}
    engine.build_schema(desc)
    assert list(engine.build_index_params(desc))[0].get_index_configs()["M"] == 8
    broken = {**desc, "fields": [desc["fields"][0], {**desc["fields"][1], "params": {}}],
              "indexes": [{**desc["indexes"][0], "field_name": "gone"}]}
    with pytest.raises(IntegrityError, match="without a dim; index 'v' on unknown field"):
        engine.build_schema(broken)


def test_a_fingerprint_that_is_not_a_milvus_backups_is_named_damaged(repo):
    with repo.begin("milvus", "2026-11-20", "t") as pending:
        pending.commit(BackupOutcome({"collections": {"c": {"rows": 3}}}, {}, "v2.3.5-lite"))
    record = repo.get("milvus", "2026-11-20")
    with pytest.raises(DamagedBackup, match="milvus backup 2026-11-20 .*fingerprint"):
        engine.fingerprint_of(record)
    with pytest.raises(DamagedBackup):
        engine.verify(repo, record)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unknown_collections_and_an_unreachable_server_are_clear_and_change_nothing(
        client, ms, repo, shared, kinds):
    with pytest.raises(InvalidRequest, match=r"has no collection\(s\) nope_missing; it has: .*"
                                             "ministry_text"), \
            repo.begin("milvus", DAY, "t") as pending:
        engine.backup(ms, pending, collections=["ministry_text", "nope_missing"])
    assert repo.get("milvus", DAY) is None and repo.backend.list_children(f"milvus/{DAY}") == []

    port = free_port()
    gone = engine.MilvusServer(f"http://127.0.0.1:{port}", "secret-token-1234", timeout_s=5)
    with pytest.raises(StoreUnreachable, match=f"Milvus http://127.0.0.1:{port}") as caught, \
            repo.begin("milvus", DAY, "t") as pending:
        engine.backup(gone, pending)
    assert "secret-token-1234" not in str(caught.value)
    assert repo.get("milvus", DAY) is None

    directory, _, record = shared
    repo = BackupRepository(FilesystemBackend(directory))
    with pytest.raises(InvalidRequest, match=f"has no collection\\(s\\) other; it has: .*{kinds}"):
        engine.restore(repo, record, ms, targets={"other": "other_r"})
    with pytest.raises(StoreUnreachable):
        engine.restore(repo, record, gone, targets={kinds: f"{kinds}_u"})
    with pytest.raises(InvalidRequest, match="not a valid Milvus collection name"):
        engine.restore(repo, record, ms, targets={kinds: "bad-name"})


# -- through Dagster -----------------------------------------------------------------------

def resources(ms: engine.MilvusServer, repo_dir: Path, collections: str) -> dict:
    return {"repository": BackupRepositoryResource(location=str(repo_dir)),
            "milvus": MilvusResource(uri=ms.uri, token=ms.token,
                                                 collections=collections,
                                                 storage_root=ms.storage_root)}


def test_assets_and_restore_job(client, ms, repo, repo_dir, auto, originals, dropped):
    instance = dg.DagsterInstance.ephemeral()
    res = resources(ms, repo_dir, auto)
    result = dg.materialize(
        [milvus_defs.milvus_backup, milvus_defs.milvus_backup_verified,
         milvus_defs.milvus_retention],
        partition_key=DAY, instance=instance, resources=res)
    assert result.success
    [mat] = result.asset_materializations_for_node("milvus_backup")
    assert mat.metadata["rows"].value == mat.metadata["rows_after"].value == 3000
    assert mat.metadata[f"rows_{auto}"].value == 3000 and mat.metadata["collections"].value == 1
    assert mat.metadata["size_bytes"].value > 0 and mat.metadata["duration_s"].value > 0
    assert repo.get("milvus", DAY).verified
    manifest = (repo_dir / "milvus" / DAY / "manifest.json").read_text()
    assert json.loads(manifest)["fingerprint"]["rows"] == 3000

    config = milvus_defs.RestoreMilvusConfig(collections=[auto], suffix="_dg",
                                             auto_id_mode="explicit_ids")
    dropped.append(f"{auto}_dg")
    run = milvus_defs.restore_milvus_job.execute_in_process(
        run_config=dg.RunConfig(ops={"restore_milvus": config}), resources=res,
        instance=instance)
    assert run.success
    out = run.output_for_node("restore_milvus")
    assert out["matches_manifest"] and out["collections"][auto]["target"] == f"{auto}_dg"
    assert out["collections"][auto]["auto_id_mode"] == "explicit_ids"
    assert rows_of(client, f"{auto}_dg") == originals[auto]  # ids kept, auto_id dropped
    assert client.describe_collection(f"{auto}_dg")["auto_id"] is False

    for config, message in (
            (milvus_defs.RestoreMilvusConfig(partition_key="2026-11-01"),
             "no backup for partition '2026-11-01'"),
            (milvus_defs.RestoreMilvusConfig(collections=[auto], suffix="_dg"),
             f"{auto}_dg exist"),
            (milvus_defs.RestoreMilvusConfig(target_collection="x", in_place=True),
             "either target_collection or in_place")):
        refused = milvus_defs.restore_milvus_job.execute_in_process(
            run_config=dg.RunConfig(ops={"restore_milvus": config}), resources=res,
            instance=instance, raise_on_error=False)
        assert not refused.success
        assert message in str(refused.failure_data_for_node("restore_milvus").error)


def test_definitions_are_catalogued_and_the_launchpad_is_documented():
    defs = dg.Definitions.merge(milvus_defs.defs, dg.Definitions(resources={
        "repository": BackupRepositoryResource(location="/tmp/unused"),
        "milvus": MilvusResource(uri="http://127.0.0.1:19530")}))
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    for name in ("milvus_backup", "milvus_backup_verified", "milvus_retention"):
        node = graph.get(dg.AssetKey(name))
        assert node.group_name == "milvus" and "milvus" in node.kinds and node.description
        assert defs.resolve_assets_def(name).node_def.pool == "milvus"
    job = defs.resolve_job_def("restore_milvus_job")
    fields = job.graph.node_named("restore_milvus").definition.config_schema.config_type.fields
    assert all(field.description for field in fields.values())
    assert milvus_defs.POLICY.retention.days == 7 and milvus_defs.POLICY.rpo.days == 1
    assert defs.resolve_schedule_def("milvus_backup_job_schedule").cron_schedule == "0 2 * * *"
