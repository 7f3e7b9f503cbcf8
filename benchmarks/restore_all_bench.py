"""Restore-all: every store back to one point in time, the stores one after the other against
all at once, on the same backups in one run.

The data, on one devstack (PostgreSQL, Redis, the S3 server, Milvus), made by the store
benchmarks' own generators at a fraction of their sizes (options below): a pgbench database
plus random rows, Redis keys in two dbs with TTLs, MinIO objects of mixed sizes with metadata
and tags, a Milvus collection of 384-d vectors in three partitions with an HNSW index. Each
store is backed up and verified with ``rag-backup backup STORE --verify``; then

sequential  ``rag-backup restore-all --at now --one-store-at-a-time``: the stores one after
            the other (what restore-all did before)
concurrent  ``rag-backup restore-all --at now``: all stores at once, one thread each

each into scratch targets (new database, a private redis-server replayed into, new bucket, new
collection; removed after each run), every comparison included (a run whose stores do not all
match its backup fails the benchmark). Reported: wall time, CPU, peak RSS of the process tree,
each store's own restore time inside the run, and concurrent / sequential.

This machine has 2 cores and every server on it: the stores' restores compete for them, so the
gain here is the floor of what separate servers give (there, restore-all takes about as long as
its slowest store: benchmarks/README.md, "RTO at production scale").

Usage::

    .venv/bin/python benchmarks/restore_all_bench.py [--pg-scale 20] [--redis-keys 300000]
        [--objects 2000] [--vectors 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import milvus_bench
import minio_bench
import postgres_bench
import redis_bench
from measure import (  # noqa: E402  (sibling module)
    MB,
    MeasuredRow,
    bench_main,
    log,
    open_repository,
    run_measured,
)
from psycopg2 import sql

from rag_backup.devstack import DevStack
from rag_backup.engines import milvus as milvus_engine
from rag_backup.engines import minio as minio_engine
from rag_backup.engines import postgres as pg_engine
from rag_backup.engines import redis as redis_engine
from rag_backup.repository import BackupRepository

DATABASE = "bench_all"
TIMEOUT_S = 3 * 3600.0
STORES = ("postgres", "redis", "minio", "milvus")


@dataclass
class Row(MeasuredRow):
    stores_s: dict[str, float] = field(default_factory=dict)
    note: str = ""


def cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("rag-backup")), *args]


def populate(env: dict[str, str], args: argparse.Namespace) -> dict[str, str]:
    """Every store's data; returns what each holds, for the report."""
    server = pg_engine.PostgresServer(env["RAG_PG_HOST"], int(env["RAG_PG_PORT"]),
                                      env["RAG_PG_USER"], env["RAG_PG_PASSWORD"])
    log(f"postgres: pgbench -i -s {args.pg_scale} + {args.pg_scale * 20_000:,} random rows")
    dataset = postgres_bench.create_dataset(server, DATABASE, args.pg_scale,
                                            args.pg_scale * 20_000)
    redis_server = redis_engine.RedisServer(env["RAG_REDIS_HOST"], int(env["RAG_REDIS_PORT"]),
                                            env["RAG_REDIS_PASSWORD"])
    log(f"redis: {args.redis_keys:,} keys")
    redis_bench.populate(redis_server.client, args.redis_keys)
    s3 = minio_engine.S3Endpoint(env["RAG_S3_ENDPOINT"], env["RAG_S3_ACCESS_KEY"],
                                 env["RAG_S3_SECRET_KEY"], env["RAG_S3_REGION"]).client()
    s3.create_bucket(Bucket=minio_bench.BUCKET)
    log(f"minio: {args.objects:,} objects")
    _, total = minio_bench.populate(s3, args.objects)
    log(f"milvus: {args.vectors:,} vectors (384-d, HNSW)")
    milvus_bench.populate(env["RAG_MILVUS_URI"], args.vectors)
    return {"postgres": f"{dataset.size_bytes / MB:,.0f} MB ({DATABASE})",
            "redis": f"{args.redis_keys:,} keys", "minio": f"{args.objects:,} objects, "
            f"{total / MB:,.0f} MB", "milvus": f"{args.vectors:,} x 384-d"}


def remove_scratch(env: dict[str, str], restored: dict, repo: BackupRepository) -> None:
    """What one restore-all created: its database, bucket and collection."""
    server = pg_engine.PostgresServer(env["RAG_PG_HOST"], int(env["RAG_PG_PORT"]),
                                      env["RAG_PG_USER"], env["RAG_PG_PASSWORD"])
    for name in restored["postgres"]["target"].split(", "):
        postgres_bench.admin_execute(server, sql.SQL("DROP DATABASE IF EXISTS {}").format(
            sql.Identifier(name)))
    endpoint = minio_engine.S3Endpoint(env["RAG_S3_ENDPOINT"], env["RAG_S3_ACCESS_KEY"],
                                       env["RAG_S3_SECRET_KEY"], env["RAG_S3_REGION"])
    for bucket in restored["minio"]["target"].split(", "):
        minio_engine.remove_bucket(endpoint, bucket, repo=repo)
    milvus_engine.drop_collections(milvus_bench.server_for(env["RAG_MILVUS_URI"]),
                                   restored["milvus"]["target"].split(", "))


def benchmark(args: argparse.Namespace, work: Path) -> dict:
    stack = DevStack(root=work / "stack", services=("postgres", "redis", "s3", "milvus"))
    env = stack.up(seed=False)
    try:
        env = {**env, "RAG_PG_DATABASES": DATABASE, "RAG_MINIO_BUCKETS": minio_bench.BUCKET,
               "RAG_MILVUS_COLLECTIONS": milvus_bench.COLLECTION,
               "RAG_BACKUP_REPOSITORY": str(work / "repo")}
        data = populate(env, args)
        repo = open_repository(work / "repo")
        for store in STORES:
            log(f"{store}: backup and verify")
            done = run_measured(cli("backup", store, "--verify", "--json"),
                                what=f"backup {store}", timeout_s=TIMEOUT_S, env=env)
            if json.loads(done.stdout)["verified"] != "yes":
                raise RuntimeError(f"the {store} backup did not verify: {done.stdout}")
        rows = []
        for who, extra in (("sequential", ["--one-store-at-a-time"]), ("concurrent", [])):
            log(f"restore-all, {who}")
            stats = run_measured(cli("restore-all", "--at", "now", "--scratch-dir", "",
                                     *extra, "--json"),
                                 what=f"restore-all ({who})", timeout_s=TIMEOUT_S, env=env)
            doc = json.loads(stats.stdout)
            restored = doc["restored"]
            try:
                differing = [s for s, r in restored.items() if not r["matches_manifest"]]
                if differing or set(restored) != set(STORES):
                    raise RuntimeError(f"restore-all ({who}) restored {sorted(restored)}; "
                                       f"differing: {differing}")
            finally:
                remove_scratch(env, restored, repo)
            rows.append(Row.of("restore-all", who, " ".join(["restore-all", *extra]), stats,
                               stores_s={s: r["seconds"] for s, r in restored.items()},
                               note=f"in-run restore time {doc['restore_wall_s']:.1f} s"))
        return {"data": data, "rows": [asdict(r) for r in rows],
                "ratio": rows[1].wall_s / rows[0].wall_s}
    finally:
        stack.down()


def render(report: dict) -> str:
    lines = ["data: " + "; ".join(f"{s} {d}" for s, d in report["data"].items()), "",
             "| run | wall s | CPU s | tree RSS MB | largest process MB | "
             + " | ".join(f"{s} s" for s in STORES) + " | note |",
             "|---|---|---|---|---|" + "---|" * len(STORES) + "---|"]
    for r in report["rows"]:
        lines.append(f"| {r['who']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['tree_rss_mb']:.0f} | {r['proc_rss_mb']:.0f} | "
                     + " | ".join(f"{r['stores_s'][s]:.1f}" for s in STORES)
                     + f" | {r['note']} |")
    lines += ["", f"concurrent / sequential wall time: {report['ratio']:.2f}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-scale", type=int, default=20,
                        help="pgbench scale (70 is the PostgreSQL benchmark's 1.66 GB)")
    parser.add_argument("--redis-keys", type=int, default=300_000)
    parser.add_argument("--objects", type=int, default=2_000)
    parser.add_argument("--vectors", type=int, default=100_000)
    os.environ.setdefault("RAG_PROGRESS_EVERY_S", "60")
    return bench_main(parser, benchmark, render, prefix="restore-all-bench-")


if __name__ == "__main__":
    sys.exit(main())
