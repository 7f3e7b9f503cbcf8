"""Milvus backup and restore: rag-backup's engine against a bare iterator loop and the runbook.

What is compared, in one run, on one collection of ``--rows`` rows (default 200,000) of
384-dimensional float vectors (plus a Hindi/English VARCHAR and a language tag, in three
partitions, HNSW index, loaded) in a dedicated devstack Milvus 2.3.5 standalone server:

backup
  bare      ``query_iterator`` over the collection, rows discarded: the floor of any streamed
            export (same batch size as ours)
  runbook   the runbook's export, ``Collection(name).query(expr="", output_fields=["*"])`` and
            ``json.dump`` to a file; and the obvious next attempt with ``limit=<rows>``. Both
            are recorded with how they fail on a real Milvus
  ours      ``engines.milvus.backup()``: iterator, Arrow batches, Parquet (zstd) streamed into a
            filesystem repository with sha256 and fsync, count(*) before and after, probes
verify
  ours      ``verify()``: sha256, every Parquet file read in batches, description re-created
            offline
restore
  bare      a bare insert loop: ``MilvusClient.insert`` of the same rows (already in memory)
            in our batch size into a new collection with the same partitions, no index, no
            flush: the floor of a restore by inserts
  bulk      the server's bulk import: the same rows written as numpy column files into the
            server's own storage (``RAG_MILVUS_STORAGE_ROOT``), one ``do_bulk_insert`` per
            partition, timed until every task is Completed (the rows are then sealed
            segments, as after a flush)
  ours      ``restore()`` into a new collection: staging collection, batched inserts (column
            by column, see ``engines/milvus/insert.py``), flush, HNSW index build, load, count
            and probe checks, rename. ``rows/s`` includes the index build; the note gives the
            insert phase alone and inserts + flush, the part the bulk import replaces
encryption at rest
  ours+enc  the same backup and restore (into another collection) with an encrypted repository
            (a second directory; a key generated for the run, passed as RAG_BACKUP_ENCRYPT_TO /
            RAG_BACKUP_IDENTITY); the report gives encrypted / clear for time and peak memory
            (target: time <= 1.10)

Measurement (see ``measure.py``): each contender runs in its own process session; wall time,
CPU and the peak RSS of its process tree. The Milvus server's own work counts in wall time only.
There is no native contender: milvus-backup (a Go binary) is not installable here.

Usage::

    .venv/bin/python benchmarks/milvus_bench.py [--rows 200000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from measure import (  # noqa: E402  (sibling module)
    MB,
    MeasuredRow,
    ProcessStats,
    bench_main,
    encryption_env,
    encryption_overhead,
    log,
    open_repository,
    render_encryption,
    run_measured,
)
from pymilvus import DataType, MilvusClient

from rag_backup.devstack import DevStack
from rag_backup.engines import milvus as engine

PARTITION = "2026-11-24"
COLLECTION = "bench_vectors"
TARGET = "bench_vectors_restored"
DIM = 384
LANGUAGES = ("hi", "en", "hi_en")
INSERT_BATCH = 5000
TIMEOUT_S = 3600.0
TEXT = "प्रधानमंत्री किसान सम्मान निधि योजना के अंतर्गत आवेदन — PM-KISAN application {i}"


@dataclass
class Row(MeasuredRow):
    rows: int | None = None
    artifact_mb: float | None = None
    note: str = ""


def generated(rows: int, batch: int, first_id: int = 0) -> Iterator[tuple[str, list[dict]]]:
    """The benchmark's rows in batches, each with its partition: deterministic unit vectors,
    the languages in turn by batch."""
    rng = np.random.default_rng(2024)
    for start in range(0, rows, batch):
        count = min(batch, rows - start)
        vectors = rng.standard_normal((count, DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        language = LANGUAGES[(start // batch) % len(LANGUAGES)]
        yield f"lang_{language}", [
            {"id": first_id + start + i, "embedding": vectors[i], "text": TEXT.format(i=start + i),
             "language": language} for i in range(count)]


def populate(uri: str, rows: int) -> None:
    """The benchmark collection: deterministic unit vectors, three partitions, HNSW, loaded."""
    client = MilvusClient(uri=uri, timeout=TIMEOUT_S)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                        description="benchmark: RAG text chunks")
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=DIM)
    schema.add_field("text", DataType.VARCHAR, max_length=1024)
    schema.add_field("language", DataType.VARCHAR, max_length=16)
    client.create_collection(COLLECTION, schema=schema, consistency_level="Strong")
    for language in LANGUAGES:
        client.create_partition(COLLECTION, f"lang_{language}")
    for partition, batch in generated(rows, INSERT_BATCH, first_id=100_000):
        client.insert(COLLECTION, batch, partition_name=partition)
    client.flush(COLLECTION, timeout=TIMEOUT_S)
    index = client.prepare_index_params()
    index.add_index(field_name="embedding", index_type="HNSW", metric_type="COSINE",
                    params={"M": 16, "efConstruction": 64})
    client.create_index(COLLECTION, index, timeout=TIMEOUT_S)
    engine._wait_indexes(client, server_for(uri), COLLECTION)
    client.load_collection(COLLECTION, timeout=TIMEOUT_S)
    client.close()


def empty_copy(uri: str, server: engine.MilvusServer, target: str
               ) -> tuple[MilvusClient, dict]:
    """A new collection ``target`` with the benchmark collection's schema and partitions, no
    index; the client, and the benchmark collection's description."""
    client = MilvusClient(uri=uri, timeout=TIMEOUT_S)
    desc = engine.describe(client, server, COLLECTION)
    client.create_collection(target, schema=engine.build_schema(desc),
                             consistency_level="Strong")
    for language in LANGUAGES:
        client.create_partition(target, f"lang_{language}")
    return client, desc


def server_for(uri: str) -> engine.MilvusServer:
    return engine.MilvusServer(uri, os.environ.get("RAG_MILVUS_TOKEN", ""),
                               timeout_s=600, long_timeout_s=TIMEOUT_S)


def worker(argv: list[str]) -> int:
    """``_worker ACTION [PATH [TARGET]]``: one contender; a JSON summary on stdout."""
    action = argv[0]
    uri = os.environ["RAG_MILVUS_URI"]
    server = server_for(uri)
    if action == "iterate":
        client = MilvusClient(uri=uri, timeout=TIMEOUT_S)
        batch = engine.auto_batch_rows(engine.describe(client, server, COLLECTION))
        iterator = client.query_iterator(COLLECTION, batch_size=batch, output_fields=["*"])
        total = 0
        while rows := iterator.next():
            total += len(rows)
        iterator.close()
        print(json.dumps({"rows": total, "batch": batch}))
    elif action in ("export", "export_limit"):
        from pymilvus import Collection, connections

        connections.connect(uri=uri)
        collection = Collection(COLLECTION)
        out = Path(argv[1])
        try:
            kwargs = {"limit": collection.num_entities} if action == "export_limit" else {}
            data = collection.query(expr="", output_fields=["*"], **kwargs)
            with open(out, "w") as fh:
                json.dump(data, fh, default=float)
            print(json.dumps({"rows": len(data), "bytes": out.stat().st_size}))
        except Exception as exc:  # the point of this contender: how the runbook fails
            message = getattr(exc, "message", None) or str(exc)
            print(json.dumps({"rows": 0, "error": f"{type(exc).__name__}: {message}"}))
    elif action == "backup":
        repo = open_repository(argv[1])
        with repo.begin("milvus", PARTITION, "milvus-bench") as pending:
            out = engine.backup(server, pending, collections=[COLLECTION])
            manifest = pending.commit(out)
        print(json.dumps({"rows": out.rows, "artifact_bytes": manifest.size_bytes,
                          "files": len(manifest.artifacts)}))
    elif action == "verify":
        repo = open_repository(argv[1])
        print(json.dumps(engine.verify(repo, repo.get("milvus", PARTITION))))
    elif action == "insert_loop":  # the floor of a restore by inserts: rows already in memory
        target, rows = argv[1], int(argv[2])
        client, desc = empty_copy(uri, server, target)
        batch = engine.auto_batch_rows(desc)  # the batch size our restore inserts with
        started, done = time.monotonic(), 0
        for partition, chunk in generated(rows, batch):
            client.insert(target, chunk, partition_name=partition)
            done += len(chunk)
        insert_s = time.monotonic() - started
        client.drop_collection(target)
        print(json.dumps({"rows": done, "insert_s": insert_s, "batch": batch}))
    elif action == "bulk_import":  # the server reads numpy column files from its storage
        target, rows = argv[1], int(argv[2])
        client, desc = empty_copy(uri, server, target)
        by_partition: dict[str, list[dict]] = {}
        for partition, chunk in generated(rows, engine.auto_batch_rows(desc)):
            by_partition.setdefault(partition, []).extend(chunk)
        handler = client._get_connection()
        started, tasks = time.monotonic(), []
        for partition, chunk in by_partition.items():
            folder = Path(os.environ["RAG_MILVUS_STORAGE_ROOT"]) / "bench-import" / target / \
                partition
            folder.mkdir(parents=True)
            columns = {"id": np.array([r["id"] for r in chunk], dtype=np.int64),
                       "embedding": np.stack([r["embedding"] for r in chunk]),
                       "text": np.array([r["text"] for r in chunk]),
                       "language": np.array([r["language"] for r in chunk])}
            for name, column in columns.items():
                np.save(folder / f"{name}.npy", column)
            tasks.append(handler.do_bulk_insert(
                target, partition, [str(folder / f"{name}.npy") for name in columns],
                timeout=TIMEOUT_S))
        done = 0
        for task in tasks:
            while (state := handler.get_bulk_insert_state(task)).state_name != "Completed":
                if state.state_name.startswith("Failed"):
                    raise RuntimeError(f"bulk import failed: {state.infos}")
                time.sleep(0.1)
            done += int(state.row_count)
        import_s = time.monotonic() - started
        client.drop_collection(target)
        print(json.dumps({"rows": done, "import_s": import_s}))
    else:
        repo = open_repository(argv[1])
        marks: list[tuple[float, str]] = []
        started = time.monotonic()
        report = engine.restore(repo, repo.get("milvus", PARTITION), server,
                                targets={COLLECTION: argv[2]},
                                log=lambda m: marks.append((time.monotonic() - started, m)))
        inserted = [t for t, m in marks if ": inserted " in m]
        flushed = [t for t, m in marks if ": flushed" in m]
        checked = [t for t, m in marks if "match the manifest" in m]
        [collection] = report.collections
        print(json.dumps({"rows": report.rows, "matches": report.matches_manifest,
                          "insert_s": inserted[-1], "flushed_s": flushed[-1],
                          "checked_s": checked[-1],
                          "probes": f"{collection.probes_top1}/{collection.probes}"}))
    return 0


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_worker", *args]


def measured(phase: str, who: str, what: str, argv: list[str], env: dict[str, str]
             ) -> tuple[Row, ProcessStats, dict]:
    log(f"{phase} {who}: {what}")
    stats = run_measured(argv, what=f"{phase} {who}", timeout_s=TIMEOUT_S, env=env)
    result = json.loads(stats.stdout.strip().splitlines()[-1])
    return Row.of(phase, who, what, stats, rows=result.get("rows")), stats, result


def shorten(error: str) -> str:
    return re.sub(r"\s+", " ", error)[:150]


def benchmark(rows: int, work: Path) -> dict:
    stack = DevStack(root=work / "stack", services=("milvus",))
    env = stack.up(seed=False)
    try:
        log(f"populating {rows:,} rows of {DIM}-d vectors (HNSW index, loaded)")
        started = time.monotonic()
        populate(env["RAG_MILVUS_URI"], rows)
        log(f"populated in {time.monotonic() - started:.1f} s")
        child_env = {**env, "PYTHONWARNINGS": "ignore"}
        table = []

        row, _, result = measured("backup", "bare", "query_iterator loop, rows discarded",
                                  me("iterate"), child_env)
        row.note = f"batch {result['batch']}"
        table.append(row)
        for action, what in (("export", 'runbook: query(expr="", ["*"]) + json.dump'),
                             ("export_limit", "same with limit=<rows>")):
            out = work / f"{action}.json"
            row, _, result = measured("backup", "runbook", what, me(action, str(out)),
                                      child_env)
            row.note = (f"FAILED: {shorten(result['error'])}" if "error" in result
                        else f"{result['rows']} rows, {result['bytes'] / MB:.1f} MB JSON")
            if "bytes" in result:
                row.artifact_mb = result["bytes"] / MB
            table.append(row)
        # ours, then ours with an encrypted repository (a second directory), on the same data
        repos = {"ours": work / "repo", "ours+enc": work / "repo-enc"}
        envs = {who: {**child_env, **encryption_env(who == "ours+enc")} for who in repos}
        for who, repo in repos.items():
            row, _, result = measured("backup", who, "backup() Parquet/zstd into the repository",
                                      me("backup", str(repo)), envs[who])
            row.artifact_mb = result["artifact_bytes"] / MB
            row.note = f"{result['files']} artifacts"
            table.append(row)
        row, _, result = measured("verify", "ours", "verify() sha256 + Parquet + schema",
                                  me("verify", str(repos["ours"])), envs["ours"])
        row.rows = result["rows"]
        table.append(row)
        row, _, result = measured("restore", "bare", "insert loop, same batches, no index",
                                  me("insert_loop", f"{TARGET}_bare", str(rows)), child_env)
        row.note = (f"inserts {result['insert_s']:.1f} s "
                    f"({result['rows'] / result['insert_s']:,.0f} rows/s), batch "
                    f"{result['batch']}; nothing flushed, indexed or checked")
        table.append(row)
        insert_rates = {"bare": result["rows"] / result["insert_s"]}
        row, _, result = measured("restore", "bulk", "bulk import, numpy files in its storage",
                                  me("bulk_import", f"{TARGET}_bulk", str(rows)), child_env)
        row.note = (f"files written and imported in {result['import_s']:.1f} s "
                    f"({result['rows'] / result['import_s']:,.0f} rows/s), sealed; "
                    "nothing indexed or checked")
        table.append(row)
        sealed_s = {"bulk": result["import_s"]}
        targets = {"ours": TARGET, "ours+enc": f"{TARGET}_enc"}
        for who, repo in repos.items():
            row, _, result = measured("restore", who, "restore() insert, index, load, check",
                                      me("restore", str(repo), targets[who]), envs[who])
            row.note = (f"matches manifest: {result['matches']}; probes {result['probes']}; "
                        f"inserts {result['insert_s']:.1f} s "
                        f"({result['rows'] / result['insert_s']:,.0f} rows/s), + flush "
                        f"{result['flushed_s']:.1f} s, then HNSW build + load + checks "
                        f"{result['checked_s'] - result['flushed_s']:.1f} s")
            sealed_s[who] = result["flushed_s"]
            table.append(row)
            insert_rates[who] = result["rows"] / result["insert_s"]
        by = {(r.phase, r.who): asdict(r) for r in table}
        return {"rows": rows, "dim": DIM, "raw_vector_mb": rows * DIM * 4 / MB,
                "table": [asdict(r) for r in table], "insert_rows_per_s": insert_rates,
                "sealed_s": sealed_s,
                "encryption": encryption_overhead({
                    phase: (by[(phase, "ours")], by[(phase, "ours+enc")])
                    for phase in ("backup", "restore")})}
    finally:
        stack.down()


def render(report: dict) -> str:
    rows = report["rows"]
    lines = [f"Milvus benchmark: {rows:,} rows x {report['dim']}-d float vectors "
             f"({report['raw_vector_mb']:.0f} MB of raw vectors), 3 partitions, HNSW, "
             "Milvus 2.3.5 standalone", "",
             f"{'phase':8}{'who':10}{'what':44}{'wall s':>8}{'rows/s':>10}{'artifact MB':>12}"
             f"{'tree RSS MB':>12}{'proc RSS MB':>12}{'CPU s':>8}  note"]
    by = {}
    for r in report["table"]:
        by.setdefault((r["phase"], r["who"]), r)
        done = r["rows"] or 0
        rate = f"{done / r['wall_s']:,.0f}" if done else "-"
        artifact = f"{r['artifact_mb']:.1f}" if r["artifact_mb"] is not None else "-"
        lines.append(f"{r['phase']:8}{r['who']:10}{r['what']:44}{r['wall_s']:8.2f}{rate:>10}"
                     f"{artifact:>12}{r['tree_rss_mb']:12.1f}{r['proc_rss_mb']:12.1f}"
                     f"{r['cpu_s']:8.2f}  {r['note']}")

    def ratio(a, b, field="wall_s"):
        return by[a][field] / by[b][field]

    rates = report["insert_rows_per_s"]

    lines += ["", "ratios (ours / other; < 1 is better for ours)",
              f"  backup time, ours / bare iterator loop        "
              f"{ratio(('backup', 'ours'), ('backup', 'bare')):.2f}",
              f"  backup tree RSS, ours / bare iterator loop    "
              f"{ratio(('backup', 'ours'), ('backup', 'bare'), 'tree_rss_mb'):.2f}",
              f"  backup size, ours / raw vectors               "
              f"{by[('backup', 'ours')]['artifact_mb'] / report['raw_vector_mb']:.2f}",
              f"  restore time / backup time                    "
              f"{ratio(('restore', 'ours'), ('backup', 'ours')):.2f}",
              f"  restore inserts rows/s, ours / bare loop      "
              f"{rates['ours'] / rates['bare']:.2f}  (>= 1.00 is the target; > 1 is better)",
              f"  rows sealed, ours (insert+flush) / bulk import "
              f"{report['sealed_s']['ours'] / report['sealed_s']['bulk']:.2f}",
              "", *render_encryption(report["encryption"])]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        return worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    return bench_main(parser, lambda args, work: benchmark(args.rows, work), render,
                      prefix="milvus-bench-")


if __name__ == "__main__":
    sys.exit(main())
