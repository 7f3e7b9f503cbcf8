"""Redis backup and restore: rag-backup's engine against the native tool and the runbook.

What is compared, in one run, on one dataset of ``--keys`` keys (default 1,000,000) in two
databases of a dedicated devstack redis-server (70% cache strings with a TTL, 20% session
hashes with a TTL, 10% plain strings):

backup
  native    ``redis-cli --rdb FILE``: the RDB as a replica receives it
  runbook   ``redis-cli BGSAVE; sleep 5; cp <dir>/dump.rdb FILE`` (needs the server's disk); the
            report says whether the copied file was the fresh one (LASTSAVE changed before the
            copy) or a stale one
  ours      ``engines.redis.backup()``: redis-cli --rdb, fingerprint by loading the file into a
            private redis-server, zstd-3, sha256, fsync, committed to a filesystem repository
verify
  ours      ``verify()``: sha256, zstd, redis-check-rdb, counts against the fingerprint
restore (into the emptied server)
  native    the runbook's restore: a redis-server started on the RDB, timed until it has
            loaded (``loading:0``); the server must be stopped for this in production
  ours      ``replay()``: DUMP/RESTORE ... ABSTTL pipelined from a private server holding the
            backup into the running, emptied server
encryption at rest
  ours+enc  the same backup and replay with an encrypted repository (a second directory; a key
            generated for the run, passed as RAG_BACKUP_ENCRYPT_TO / RAG_BACKUP_IDENTITY); the
            report gives encrypted / clear for time and peak memory (target: time <= 1.10)

Measurement (see ``measure.py``): each contender runs in its own process session; wall time,
CPU and the peak RSS of its process tree (redis-cli, the private redis-server, python). The
benchmarked server's own work counts in wall time only. ``keys/s`` = keys / wall time.

Usage::

    .venv/bin/python benchmarks/redis_bench.py [--keys 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
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

from rag_backup.devstack import DevStack
from rag_backup.engines import redis as engine

PARTITION = "2026-11-24-02:00"
BATCH = 10_000
TIMEOUT_S = 3600.0


@dataclass
class Row(MeasuredRow):
    artifact_mb: float | None = None
    note: str = ""


def populate(client_for, keys: int) -> None:
    """Fill dbs 0 and 1 deterministically, pipelined in batches."""
    value = "उत्तर answer cached " * 8
    for db in (0, 1):
        c = client_for(db)
        pipe = c.pipeline(transaction=False)
        share = keys // 2
        for i in range(share):
            kind = i % 10
            if kind < 7:
                pipe.set(f"cache:answer:{i}", f"{value}{i}", ex=3600)
            elif kind < 9:
                pipe.hset(f"session:{i}", mapping={"user": f"u{i}", "lang": "hi",
                                                   "started": "2026-11-24T02:00:00Z",
                                                   "turns": i % 17, "doc": f"doc-{i}"})
                pipe.expire(f"session:{i}", 1800)
            else:
                pipe.set(f"config:{i}", f"value-{i}")
            if (i + 1) % BATCH == 0:
                pipe.execute()
        pipe.execute()
        c.close()


def worker(argv: list[str]) -> int:
    """``_worker backup|verify|replay REPO``: one engine call; a JSON summary on stdout."""
    action, repo_dir = argv[0], argv[1]
    server = engine.RedisServer(os.environ["RAG_REDIS_HOST"], int(os.environ["RAG_REDIS_PORT"]),
                                os.environ["RAG_REDIS_PASSWORD"])
    repo = open_repository(repo_dir)
    if action == "backup":
        with repo.begin("redis", PARTITION, "redis-bench") as pending:
            out = engine.backup(server, pending)
            manifest = pending.commit(out)
        print(json.dumps({"keys": out.keys, "artifact_bytes": manifest.size_bytes}))
    elif action == "verify":
        print(json.dumps(engine.verify(repo, repo.get("redis", PARTITION))))
    else:
        report = engine.replay(repo, repo.get("redis", PARTITION), server)
        print(json.dumps({"restored": report.restored, "matches": report.matches_manifest}))
    return 0


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_worker", *args]


def measured(phase: str, who: str, what: str, argv: list[str], env: dict[str, str]
             ) -> tuple[Row, ProcessStats]:
    log(f"{phase} {who}: {what}")
    stats = run_measured(argv, what=f"{phase} {who}", timeout_s=TIMEOUT_S, env=env)
    return Row.of(phase, who, what, stats), stats


def wait_idle(client: redis.Redis) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while client.info("persistence")["rdb_bgsave_in_progress"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the server's background save never finished")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_at_start(rdb: Path, work: Path) -> Row:
    """The runbook's restore: start a server on the RDB and wait until it has loaded it."""
    data = work / "load"
    data.mkdir()
    shutil.copy(rdb, data / "dump.rdb")
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(data), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(port=port, socket_timeout=10)
    try:
        while True:
            try:
                if client.info("persistence")["loading"] == 0:
                    break
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if time.monotonic() - started > TIMEOUT_S:
                raise RuntimeError("redis-server did not load the RDB in time")
            time.sleep(0.01)
        wall = time.monotonic() - started
        with open(f"/proc/{proc.pid}/status") as fh:
            hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))
        keys = sum(v["keys"] for k, v in client.info("keyspace").items())
    finally:
        client.close()
        proc.kill()
        proc.wait(timeout=30)
    return Row("restore", "native", "redis-server loads the RDB at start", wall, 0.0,
               hwm * 1024 / MB, hwm * 1024 / MB, note=f"{keys} keys")


def benchmark(keys: int, work: Path) -> dict:
    stack = DevStack(root=work / "stack", services=("redis",))
    env = stack.up(seed=False)
    try:
        server = engine.RedisServer(env["RAG_REDIS_HOST"], int(env["RAG_REDIS_PORT"]),
                                    env["RAG_REDIS_PASSWORD"])
        log(f"populating {keys:,} keys")
        populate(server.client, keys)
        client = server.client()
        data_dir = Path(client.config_get("dir")["dir"])
        child_env = {**env, "REDISCLI_AUTH": env["RAG_REDIS_PASSWORD"]}
        cli = ["redis-cli", "-h", server.host, "-p", str(server.port), "--no-auth-warning"]
        rows = []

        native_rdb = work / "native.rdb"
        row, _ = measured("backup", "native", "redis-cli --rdb",
                          [*cli, "--rdb", str(native_rdb)], child_env)
        row.artifact_mb = native_rdb.stat().st_size / MB
        rows.append(row)

        wait_idle(client)  # the replica sync's child must be gone, or BGSAVE is refused
        before = client.lastsave()
        runbook_rdb = work / "runbook.rdb"
        script = (f'{" ".join(cli)} BGSAVE >/dev/null && sleep 5 && '
                  f'cp "{data_dir}/dump.rdb" "{runbook_rdb}"')
        row, _ = measured("backup", "runbook", "BGSAVE; sleep 5; cp dump.rdb",
                          ["bash", "-c", script], child_env)
        after = client.lastsave()
        row.artifact_mb = runbook_rdb.stat().st_size / MB
        row.note = "fresh copy" if after != before else "STALE copy (BGSAVE not done in 5 s)"
        rows.append(row)

        # ours, then ours with an encrypted repository (a second directory), on the same data
        repos = {"ours": work / "repo", "ours+enc": work / "repo-enc"}
        for who, repo in repos.items():
            wait_idle(client)
            row, stats = measured("backup", who, "backup() zstd-3", me("backup", str(repo)),
                                  {**env, **encryption_env(who == "ours+enc")})
            row.artifact_mb = json.loads(stats.stdout)["artifact_bytes"] / MB
            rows.append(row)
        rows.append(measured("verify", "ours", "verify()", me("verify", str(repos["ours"])),
                             {**env, **encryption_env(False)})[0])

        rows.append(load_at_start(native_rdb, work))
        for who, repo in repos.items():
            client.flushall()
            row, stats = measured("restore", who, "replay() DUMP/RESTORE ABSTTL",
                                  me("replay", str(repo)),
                                  {**env, **encryption_env(who == "ours+enc")})
            result = json.loads(stats.stdout)
            row.note = f"{result['restored']} keys, matches manifest: {result['matches']}"
            rows.append(row)
        client.close()
        by = {(r.phase, r.who): asdict(r) for r in rows}
        return {"keys": keys, "rows": [asdict(r) for r in rows],
                "encryption": encryption_overhead({
                    phase: (by[(phase, "ours")], by[(phase, "ours+enc")])
                    for phase in ("backup", "restore")})}
    finally:
        stack.down()


def render(report: dict) -> str:
    keys = report["keys"]
    lines = [f"Redis benchmark: {keys:,} keys in 2 dbs (70% strings with TTL, 20% hashes with "
             "TTL, 10% plain)", "",
             f"{'phase':8}{'who':10}{'what':34}{'wall s':>8}{'keys/s':>11}{'artifact MB':>13}"
             f"{'tree RSS MB':>13}{'proc RSS MB':>13}{'CPU s':>8}  note"]
    by = {(r["phase"], r["who"]): r for r in report["rows"]}
    for r in report["rows"]:
        artifact = f"{r['artifact_mb']:.1f}" if r["artifact_mb"] is not None else "-"
        lines.append(f"{r['phase']:8}{r['who']:10}{r['what']:34}{r['wall_s']:8.2f}"
                     f"{keys / r['wall_s']:11,.0f}{artifact:>13}{r['tree_rss_mb']:13.1f}"
                     f"{r['proc_rss_mb']:13.1f}{r['cpu_s']:8.2f}  {r['note']}")

    def ratio(a, b, field="wall_s"):
        return by[a][field] / by[b][field]

    lines += ["", "ratios (ours / other; < 1 is better for ours)",
              f"  backup time, ours / native redis-cli --rdb   "
              f"{ratio(('backup', 'ours'), ('backup', 'native')):.2f}",
              f"  backup time, ours / runbook BGSAVE+copy      "
              f"{ratio(('backup', 'ours'), ('backup', 'runbook')):.2f}",
              f"  backup size, ours / native                   "
              f"{ratio(('backup', 'ours'), ('backup', 'native'), 'artifact_mb'):.2f}",
              f"  restore time, replay / load at server start  "
              f"{ratio(('restore', 'ours'), ('restore', 'native')):.2f}",
              f"  backup tree RSS, ours / native               "
              f"{ratio(('backup', 'ours'), ('backup', 'native'), 'tree_rss_mb'):.2f}",
              "", *render_encryption(report["encryption"])]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        return worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    return bench_main(parser, lambda args, work: benchmark(args.keys, work), render,
                      prefix="redis-bench-")


if __name__ == "__main__":
    sys.exit(main())
