"""MinIO (S3) backup: rag-backup's snapshot engine against ``rclone sync`` and a boto3 loop.

What is compared, in one run, on one bucket of ``--objects`` objects (default 10,000) of mixed
sizes (80% 1-8 KB, 18% 8-64 KB, 1.9% 64 KB-1 MB, 0.1% 9-12 MB; content types and user
metadata set, every tenth object tagged) on a dedicated moto S3 server started with the devstack:

full backup (night 1)
  rclone    ``rclone sync src:BUCKET DIR`` into an empty directory: the runbook's
            ``mc mirror --remove``, done by the usual tool (8 transfers, 16 checkers,
            ``--fast-list --use-server-modtime``; credentials in RCLONE_CONFIG_SRC_* variables)
  boto3     a plain loop: list, then GET every object into a file, one at a time
  ours      ``engines.minio.backup()`` (8 workers) into an empty filesystem repository: every
            object hashed and stored as a content-addressed blob (fsynced), the snapshot written
verify
  ours      ``verify()``: every blob present and re-hashed
next night, after 1% of the objects were overwritten
  rclone    ``rclone sync`` again onto its mirror (compares size and modification time)
  ours      ``backup()`` of the next day's partition: lists, reuses unchanged objects from the
            previous snapshot, copies only the changed ones
offsite copy of the next night's backup (the offsite already holds the previous night's)
  ours      ``offsite.copy_backup(primary, offsite, "minio", partition)``, as the ``minio_offsite``
            asset runs it once the backup is verified, into an offsite repository: a bucket on
            the same S3 server (``--offsite bucket``, default) or a directory (``--offsite dir``);
            compared with the next night's ``rclone sync`` of the same change (target <= 1.2x)
restore of the whole bucket (the next night's data) into an empty bucket
  rclone    ``rclone sync MIRROR dst:BUCKET`` from its mirror back into an empty bucket (8
            transfers; it checks each upload's MD5 against the ETag)
  rclone-s3 ``rclone sync src:BUCKET dst:EMPTY``: the source bucket copied into an empty bucket
            through the client (two remotes, so no server-side copy), target of ours <= 1.1x
  ours      ``engines.minio.restore()`` (8 workers) of the next night's snapshot into an empty
            bucket, the call ``rag-backup restore minio --buckets B --target-bucket T`` makes
            (``defs.minio.run_restore``): the pre-flight (snapshot and every blob hashed before
            anything is written; its seconds are in the note), the copy (each blob hashed again
            as it is read), then the comparison that reads every object back
encryption at rest
  ours+enc  every row of ours again with an encrypted repository (a second directory and
            offsite; a key generated for the run, passed as RAG_BACKUP_ENCRYPT_TO /
            RAG_BACKUP_IDENTITY); the report gives encrypted / clear for the backups and the
            restore, time and peak memory (target: time <= 1.10)

Measurement (see ``measure.py``): each contender runs in its own process session; wall time,
CPU and the peak RSS of its process tree. The S3 server's own work counts in wall time only.
moto serves about 300 requests/s on one core, so the absolute rates are moto's; compare the
ratios, which are taken on the same server in the same run.

Usage::

    .venv/bin/python benchmarks/minio_bench.py [--objects 10000] [--change 0.01] \
        [--offsite bucket|dir] [--json out.json]
    .venv/bin/python benchmarks/minio_bench.py --ours-only --objects 100000   # scale runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

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
from rag_backup.engines import minio as engine
from rag_backup.repository.manifest import Verification, utcnow
from rag_backup.repository.offsite import copy_backup, open_offsite

BUCKET = "bench-documents"
WORKERS = 8
WINDOW = timedelta(days=14)
TIMEOUT_S = 3600.0
NIGHT1 = (utcnow() - timedelta(days=1)).strftime("%Y-%m-%d")
NIGHT2 = utcnow().strftime("%Y-%m-%d")
CONTENT_TYPES = ("application/pdf", "text/html", "application/json", "image/png", "text/plain")
OURS = ("ours", "ours+enc")  # our engine on a clear and on an encrypted repository
OFFSITE_TARGET = 1.2  # offsite copy of the night's change / rclone sync of it (issue 16)
RESTORE_TARGET = 1.1  # full-bucket restore / rclone sync bucket -> empty bucket

BOTO3_LOOP = """
import json, os, shutil, sys
import boto3
from botocore.config import Config
dest, bucket = sys.argv[1], sys.argv[2]
client = boto3.client("s3", endpoint_url=os.environ["RAG_S3_ENDPOINT"],
                      aws_access_key_id=os.environ["RAG_S3_ACCESS_KEY"],
                      aws_secret_access_key=os.environ["RAG_S3_SECRET_KEY"],
                      region_name=os.environ["RAG_S3_REGION"],
                      config=Config(s3={"addressing_style": "path"}))
objects = size = 0
for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
    for obj in page.get("Contents", []):
        path = os.path.join(dest, obj["Key"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"]
        with open(path, "wb") as out:
            shutil.copyfileobj(body, out, 1024 * 1024)
        objects += 1
        size += obj["Size"]
print(json.dumps({"objects": objects, "bytes": size}))
"""


@dataclass
class Row(MeasuredRow):
    objects_copied: int = 0
    mb_copied: float = 0.0
    note: str = ""


# -- the data --------------------------------------------------------------------------------

def object_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.80:
        return rng.randint(1_000, 8_000)
    if r < 0.98:
        return rng.randint(8_000, 64_000)
    if r < 0.999:
        return rng.randint(64_000, 1_000_000)
    return rng.randint(9_000_000, 12_000_000)


def populate(client, count: int, seed: int = 20261124) -> tuple[list[str], int]:
    """``count`` objects of mixed sizes, uploaded by 16 threads; returns keys and bytes."""
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        prefix = ("raw", "processed", "images", "thumbnails")[i % 4]
        specs.append((f"{prefix}/{i:06d}.bin", object_size(rng), CONTENT_TYPES[i % 5]))
    specs[0] = (specs[0][0], 11_000_000, specs[0][2])  # at least one large object

    def upload(spec: tuple[str, int, str]) -> None:
        key, size, content_type = spec
        tagging = {"Tagging": f"project=bench&n={key[-10:-4]}"} if key[-5] == "7" else {}
        client.put_object(Bucket=BUCKET, Key=key, Body=os.urandom(size),
                          ContentType=content_type, Metadata={"source": "bench", "n": key[-10:]},
                          **tagging)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(upload, specs))
    return [s[0] for s in specs], sum(s[1] for s in specs)


def change(client, keys: list[str], share: float, seed: int = 7) -> tuple[int, int]:
    """Overwrite ``share`` of the objects with new content; returns (objects, bytes)."""
    rng = random.Random(seed)
    chosen = rng.sample(keys, max(1, round(len(keys) * share)))
    total = 0
    for key in chosen:
        size = object_size(rng)
        total += size
        client.put_object(Bucket=BUCKET, Key=key, Body=os.urandom(size),
                          ContentType="application/pdf", Metadata={"source": "bench", "v": "2"})
    return len(chosen), total


# -- contenders ------------------------------------------------------------------------------

def worker(argv: list[str]) -> int:
    """``_worker backup|verify|offsite|restore REPO PARTITION [OFFSITE|TARGET]``: one engine
    call; a JSON summary on stdout. The repository is encrypted when the environment says so
    (``measure.encryption_env``)."""
    action, repo_dir, partition, *target = argv
    s3 = engine.S3Endpoint(os.environ["RAG_S3_ENDPOINT"], os.environ["RAG_S3_ACCESS_KEY"],
                           os.environ["RAG_S3_SECRET_KEY"], os.environ["RAG_S3_REGION"],
                           max_connections=2 * WORKERS)
    repo = open_repository(repo_dir)
    if action == "backup":
        with repo.begin("minio", partition, "minio-bench") as pending:
            out = engine.backup(s3, pending, [BUCKET], window=WINDOW, workers=WORKERS)
            pending.commit(out)
        print(json.dumps({"objects": out.objects, "bytes": out.bytes,
                          "copied": out.objects_copied, "bytes_copied": out.bytes_copied,
                          "reused": out.objects_reused,
                          "tag_reads_saved": out.fingerprint["transfer"].get(
                              "tag_reads_saved", 0)}))
    elif action == "offsite":  # as the minio_offsite asset: the offsite opened with our keys
        offsite = open_offsite(target[0], s3_endpoint=s3.url, s3_access_key=s3.access_key,
                               s3_secret_key=s3.secret_key, s3_region=s3.region,
                               crypto=repo.crypto)
        print(json.dumps(copy_backup(repo, offsite, "minio", partition).counts()))
    elif action == "restore":  # what defs.minio.run_restore (the CLI's restore) calls
        report = engine.restore(repo, repo.get("minio", partition), s3, buckets=[BUCKET],
                                target_bucket=target[0], workers=WORKERS)
        print(json.dumps({"restored": report.total("restored"),
                          "bytes_restored": report.total("bytes_restored"),
                          "matches": report.matches_snapshot,
                          "preflight": report.preflight.to_dict()}))
    else:  # verified and recorded, as minio_backup_verified does (the offsite copies only those)
        record = repo.get("minio", partition)
        checks = engine.verify(repo, record, workers=WORKERS)
        counts = {k: v for k, v in checks.items() if isinstance(v, int)}
        repo.record_verification("minio", partition, Verification(
            record.backup_id, True, utcnow(), "minio-bench", checks=counts))
        print(json.dumps(counts))
    return 0


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_worker", *args]


def rclone_env(env: dict[str, str]) -> dict[str, str]:
    """The remotes ``src:`` and ``dst:`` (the same server) defined in the environment: no
    config file, no secret in argv. Two names, so a bucket-to-bucket sync streams through
    rclone instead of asking the server to copy."""
    remotes = {}
    for name in ("SRC", "DST"):
        remotes.update({
            f"RCLONE_CONFIG_{name}_TYPE": "s3", f"RCLONE_CONFIG_{name}_PROVIDER": "Other",
            f"RCLONE_CONFIG_{name}_ENV_AUTH": "false",
            f"RCLONE_CONFIG_{name}_ACCESS_KEY_ID": env["RAG_S3_ACCESS_KEY"],
            f"RCLONE_CONFIG_{name}_SECRET_ACCESS_KEY": env["RAG_S3_SECRET_KEY"],
            f"RCLONE_CONFIG_{name}_ENDPOINT": env["RAG_S3_ENDPOINT"],
            f"RCLONE_CONFIG_{name}_REGION": env["RAG_S3_REGION"],
            f"RCLONE_CONFIG_{name}_FORCE_PATH_STYLE": "true"})
    return {**remotes, "RCLONE_CONFIG": "/dev/null"}


def rclone_restore_argv(source: Path | str, bucket: str, log_file: Path) -> list[str]:
    """``source`` (the mirror, or a remote's bucket) into ``bucket`` (the remote ``dst:``,
    i.e. the same server)."""
    return ["rclone", "sync", str(source), f"dst:{bucket}", "--transfers", str(WORKERS),
            "--checkers", str(2 * WORKERS), "--fast-list", "--stats", "0", "-v",
            "--log-file", str(log_file)]


def rclone_argv(mirror: Path, log_file: Path) -> list[str]:
    return ["rclone", "sync", f"src:{BUCKET}", str(mirror), "--transfers", str(WORKERS),
            "--checkers", str(2 * WORKERS), "--fast-list", "--use-server-modtime",
            "--stats", "0", "-v", "--log-file", str(log_file)]


def rclone_copied(log_file: Path) -> int:
    """Objects rclone transferred, from its log (one INFO line per copied file)."""
    text = log_file.read_text(errors="replace")
    copied = len(re.findall(r": Copied \((?:new|replaced existing)\)", text))
    log_file.unlink()
    return copied


def measured(phase: str, who: str, what: str, argv: list[str], env: dict[str, str]
             ) -> tuple[Row, ProcessStats]:
    log(f"{phase} {who}: {what}")
    stats = run_measured(argv, what=f"{phase} {who}", timeout_s=TIMEOUT_S, env=env)
    return Row.of(phase, who, what, stats), stats


def age_by_a_day(repo: Path) -> None:
    """Set every file of a repository a day back, as the night between two backups would
    have aged them: the offsite copy asks the offsite only about blobs written since its last
    sync (less an hour for clocks), which minutes apart would be all of them."""
    day_ago = time.time() - 86400
    for path in repo.rglob("*"):
        if path.is_file():
            os.utime(path, (day_ago, day_ago))


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def untimed(what: str, argv: list[str], env: dict[str, str]) -> None:
    """A step of the nightly sequence the table does not show (run as the measured ones)."""
    log(f"  (not in the table) {what}")
    stats = run_measured(argv, what=what, timeout_s=TIMEOUT_S, env=env)
    log(f"  {stats.wall_s:.2f} s")


def offsite_location(kind: str, who: str, work: Path, client) -> str:
    """The offsite repository of ``who``: a new bucket on the same S3 server, or a directory."""
    if kind == "dir":
        return str(work / f"offsite-{who.replace('+', '-')}")
    bucket = f"bench-offsite-{who.replace('+', '-')}"
    client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@contextmanager
def filled_bucket(count: int, work: Path) -> Iterator[tuple[dict[str, str], object, list[str],
                                                              int]]:
    """An S3 server of our own holding ``BUCKET`` with ``count`` generated objects: yields its
    environment, a client, the keys and their total size; the server is stopped after."""
    stack = DevStack(root=work / "stack", services=("s3",))
    env = stack.up(seed=False)
    try:
        client = engine.S3Endpoint(env["RAG_S3_ENDPOINT"], env["RAG_S3_ACCESS_KEY"],
                                   env["RAG_S3_SECRET_KEY"], env["RAG_S3_REGION"],
                                   max_connections=32).client()
        client.create_bucket(Bucket=BUCKET)
        log(f"uploading {count:,} objects")
        keys, total = populate(client, count)
        log(f"{count:,} objects, {total / MB:.1f} MB")
        yield env, client, keys, total
    finally:
        stack.down()


def benchmark(count: int, share: float, offsite_kind: str, work: Path) -> dict:
    if not shutil.which("rclone"):
        raise SystemExit("rclone is not installed: apt-get install -y rclone")
    with filled_bucket(count, work) as (env, client, keys, total):
        mirror, plain = work / "rclone-mirror", work / "boto3-copy"
        # ours on a clear and on an encrypted repository, each with its own offsite
        repos = {"ours": work / "repo", "ours+enc": work / "repo-enc"}
        envs = {who: {**env, **encryption_env(who == "ours+enc")} for who in OURS}
        offsites = {who: offsite_location(offsite_kind, who, work, client) for who in OURS}
        rlog = work / "rclone.log"
        rows = []

        row, _ = measured("full", "rclone", "rclone sync (empty mirror)",
                          rclone_argv(mirror, rlog), rclone_env(env))
        row.objects_copied = rclone_copied(rlog)
        rows.append(row)

        plain.mkdir()
        row, stats = measured("full", "boto3", "list + GET loop, 1 thread",
                              [sys.executable, "-c", BOTO3_LOOP, str(plain), BUCKET], env)
        out = json.loads(stats.stdout)
        row.objects_copied, row.mb_copied = out["objects"], out["bytes"] / MB
        rows.append(row)

        for who in OURS:
            row, stats = measured("full", who, f"backup() {WORKERS} workers",
                                  me("backup", str(repos[who]), NIGHT1), envs[who])
            out = json.loads(stats.stdout)
            row.objects_copied, row.mb_copied = out["copied"], out["bytes_copied"] / MB
            row.note = f"{out['reused']} reused, {out['tag_reads_saved']} tag reads saved"
            rows.append(row)

        for who in OURS:
            row, stats = measured("verify", who, "verify() all blobs",
                                  me("verify", str(repos[who]), NIGHT1), envs[who])
            out = json.loads(stats.stdout)
            row.note = f"{out['blobs_rehashed']} blobs re-hashed"
            row.mb_copied = out["bytes_rehashed"] / MB
            rows.append(row)
            untimed(f"{who}: the previous night's copy offsite",
                    me("offsite", str(repos[who]), NIGHT1, offsites[who]), envs[who])
            age_by_a_day(repos[who])

        changed, changed_bytes = change(client, keys, share)
        log(f"overwrote {changed} objects ({changed_bytes / MB:.1f} MB)")

        row, _ = measured("next", "rclone", "rclone sync (existing mirror)",
                          rclone_argv(mirror, rlog), rclone_env(env))
        row.objects_copied = rclone_copied(rlog)
        rows.append(row)

        for who in OURS:
            row, stats = measured("next", who, f"backup() {WORKERS} workers, next day",
                                  me("backup", str(repos[who]), NIGHT2), envs[who])
            out = json.loads(stats.stdout)
            row.objects_copied, row.mb_copied = out["copied"], out["bytes_copied"] / MB
            row.note = f"{out['reused']} reused"
            rows.append(row)

        # The nightly sequence: the backup verified, then copied offsite, where the previous
        # night's copy already is (only verified backups are copied).
        for who in OURS:
            untimed(f"{who}: verify() of the next day",
                    me("verify", str(repos[who]), NIGHT2), envs[who])
            row, stats = measured("offsite", who, f"copy_backup() to offsite {offsite_kind}",
                                  me("offsite", str(repos[who]), NIGHT2, offsites[who]),
                                  envs[who])
            out = json.loads(stats.stdout)
            row.objects_copied = out["blobs_copied"]
            row.mb_copied = (out["bytes_copied"] + out["blob_bytes_copied"]) / MB
            row.note = (f"{out['blobs_copied']} blob files and {out['files_copied']} others "
                        f"copied, {out['blobs_skipped']} blob files already offsite")
            rows.append(row)

        # Restore the whole bucket (the next night's data: what the mirror and the source
        # bucket hold too) into an empty bucket each.
        targets = {"rclone": "bench-restore-rclone", "rclone-s3": "bench-restore-rclone-s3",
                   "ours": "bench-restore-ours", "ours+enc": "bench-restore-ours-enc"}
        for target in targets.values():
            client.create_bucket(Bucket=target)
        for who, source, what in (("rclone", mirror, "rclone sync mirror->empty bucket"),
                                  ("rclone-s3", f"src:{BUCKET}",
                                   "rclone sync bucket->empty bucket")):
            row, _ = measured("restore", who, what,
                              rclone_restore_argv(source, targets[who], rlog), rclone_env(env))
            row.objects_copied = rclone_copied(rlog)
            rows.append(row)

        preflight_s = {}
        for who in OURS:
            row, stats = measured("restore", who, f"restore() {WORKERS} workers, empty bucket",
                                  me("restore", str(repos[who]), NIGHT2, targets[who]),
                                  envs[who])
            out = json.loads(stats.stdout)
            pre = out["preflight"]
            preflight_s[who] = pre["duration_s"]
            row.objects_copied, row.mb_copied = out["restored"], out["bytes_restored"] / MB
            row.note = (f"pre-flight {pre['duration_s']:.2f} s ({pre['blobs_checked']} blobs, "
                        f"{pre['bytes_hashed'] / MB:.1f} MB hashed); matches {out['matches']}")
            rows.append(row)
        by = {(r.phase, r.who): asdict(r) for r in rows}

        def versus(a: tuple[str, str], b: tuple[str, str], target: float) -> dict:
            ratio = by[a]["wall_s"] / by[b]["wall_s"]
            return {"ratio": round(ratio, 4), "target": target, "within_target": ratio <= target}

        return {"objects": count, "bytes": total, "changed": changed,
                "restore_preflight_s": preflight_s["ours"],
                "restore_preflight_s_encrypted": preflight_s["ours+enc"],
                "changed_bytes": changed_bytes, "offsite": offsite_kind,
                "repository_mb_after_two_nights": tree_bytes(repos["ours"]) / MB,
                "encrypted_repository_mb_after_two_nights": tree_bytes(repos["ours+enc"]) / MB,
                "mirror_mb": tree_bytes(mirror) / MB, "rows": [asdict(r) for r in rows],
                "targets": {
                    "offsite copy time, ours / rclone sync (next)": versus(
                        ("offsite", "ours"), ("next", "rclone"), OFFSITE_TARGET),
                    "offsite copy time, ours+enc / rclone sync (next)": versus(
                        ("offsite", "ours+enc"), ("next", "rclone"), OFFSITE_TARGET),
                    "full restore time, ours / rclone bucket->bucket": versus(
                        ("restore", "ours"), ("restore", "rclone-s3"), RESTORE_TARGET),
                    "full restore time, ours+enc / rclone bucket->bucket": versus(
                        ("restore", "ours+enc"), ("restore", "rclone-s3"), RESTORE_TARGET)},
                "encryption": encryption_overhead({
                    name: (by[(phase, "ours")], by[(phase, "ours+enc")])
                    for name, phase in (("full backup", "full"), ("next backup", "next"),
                                        ("full restore", "restore"))})}


def scale_benchmark(count: int, share: float, work: Path) -> dict:
    """``--ours-only``: our engine alone (clear repository) through the same nights and restore,
    for scale runs where every contender would take hours: time and peak memory per phase."""
    with filled_bucket(count, work) as (env, client, keys, total):
        repo, env = work / "repo", {**env, **encryption_env(False)}
        rows = []
        for phase, what, action, night in (("full", "backup()", "backup", NIGHT1),
                                           ("verify", "verify()", "verify", NIGHT1)):
            row, stats = measured(phase, "ours", what, me(action, str(repo), night), env)
            rows.append(row)
        age_by_a_day(repo)
        changed, changed_bytes = change(client, keys, share)
        row, stats = measured("next", "ours", "backup(), next day", me("backup", str(repo),
                                                                       NIGHT2), env)
        row.note = f"{json.loads(stats.stdout)['reused']} reused"
        rows.append(row)
        untimed("verify() of the next day", me("verify", str(repo), NIGHT2), env)
        client.create_bucket(Bucket="bench-restore-ours")
        row, stats = measured("restore", "ours", "restore(), empty bucket",
                              me("restore", str(repo), NIGHT2, "bench-restore-ours"), env)
        out = json.loads(stats.stdout)
        row.objects_copied, row.note = out["restored"], f"matches {out['matches']}"
        rows.append(row)
        return {"objects": count, "bytes": total, "changed": changed,
                "changed_bytes": changed_bytes, "rows": [asdict(r) for r in rows]}


def render_scale(report: dict) -> str:
    n, mb = report["objects"], report["bytes"] / MB
    lines = [f"MinIO, ours only: {n:,} objects, {mb:.1f} MB, on moto S3; next night "
             f"{report['changed']} objects overwritten", "",
             "| phase | wall s | obj/s | tree RSS MB | CPU s | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['phase']} | {r['wall_s']:.2f} | {n / r['wall_s']:,.0f} | "
              f"{r['tree_rss_mb']:.1f} | {r['cpu_s']:.2f} | {r['note']} |"
              for r in report["rows"]]
    return "\n".join(lines)


def render(report: dict) -> str:
    n, mb = report["objects"], report["bytes"] / MB
    lines = [f"MinIO benchmark: {n:,} objects, {mb:.1f} MB, on moto S3 (one core); next night "
             f"{report['changed']} objects ({report['changed_bytes'] / MB:.1f} MB) overwritten",
             "",
             f"{'phase':8}{'who':10}{'what':34}{'wall s':>8}{'obj/s':>9}{'MB/s':>8}"
             f"{'copied':>8}{'tree RSS MB':>13}{'proc RSS MB':>13}{'CPU s':>8}  note"]
    by = {(r["phase"], r["who"]): r for r in report["rows"]}
    for r in report["rows"]:
        lines.append(f"{r['phase']:8}{r['who']:10}{r['what']:34}{r['wall_s']:8.2f}"
                     f"{n / r['wall_s']:9,.0f}{mb / r['wall_s']:8.1f}{r['objects_copied']:8,}"
                     f"{r['tree_rss_mb']:13.1f}{r['proc_rss_mb']:13.1f}{r['cpu_s']:8.2f}"
                     f"  {r['note']}")

    def ratio(a, b, field="wall_s"):
        return by[a][field] / by[b][field]

    full, nxt = "full", "next"
    lines += ["", "obj/s and MB/s: the whole bucket / wall time (every row, so rows compare)",
              "", "ratios (ours / other; < 1 is better for ours)",
              f"  full backup time,  ours / rclone sync        "
              f"{ratio((full, 'ours'), (full, 'rclone')):.2f}",
              f"  full backup time,  ours / boto3 loop         "
              f"{ratio((full, 'ours'), (full, 'boto3')):.2f}",
              f"  next night time,   ours / rclone sync        "
              f"{ratio((nxt, 'ours'), (nxt, 'rclone')):.2f}",
              f"  next night / full, ours                      "
              f"{ratio((nxt, 'ours'), (full, 'ours')):.2f}",
              f"  full tree RSS,     ours / rclone sync        "
              f"{ratio((full, 'ours'), (full, 'rclone'), 'tree_rss_mb'):.2f}",
              f"  full tree RSS,     ours / boto3 loop         "
              f"{ratio((full, 'ours'), (full, 'boto3'), 'tree_rss_mb'):.2f}",
              f"  next tree RSS,     ours / rclone sync        "
              f"{ratio((nxt, 'ours'), (nxt, 'rclone'), 'tree_rss_mb'):.2f}",
              f"  restore time,      ours / rclone sync        "
              f"{ratio(('restore', 'ours'), ('restore', 'rclone')):.2f}",
              f"  restore tree RSS,  ours / rclone sync        "
              f"{ratio(('restore', 'ours'), ('restore', 'rclone'), 'tree_rss_mb'):.2f}",
              f"  restore tree RSS,  ours / rclone s3->s3      "
              f"{ratio(('restore', 'ours'), ('restore', 'rclone-s3'), 'tree_rss_mb'):.2f}",
              f"  restore pre-flight / ours restore time       "
              f"{report['restore_preflight_s'] / by[('restore', 'ours')]['wall_s']:.2f}",
              f"  offsite copy time, ours+enc / ours           "
              f"{ratio(('offsite', 'ours+enc'), ('offsite', 'ours')):.2f}",
              "", f"targets (offsite: to {report['offsite']}; time ratios)"]
    for name, t in report["targets"].items():
        verdict = "ok" if t["within_target"] else "ABOVE TARGET"
        lines.append(f"  {name:<52}{t['ratio']:6.2f}  (<= {t['target']:.2f}) {verdict}")
    lines += ["", *render_encryption(report["encryption"]), "",
              f"repository after two nights: {report['repository_mb_after_two_nights']:.1f} MB "
              f"(two restorable days), encrypted "
              f"{report['encrypted_repository_mb_after_two_nights']:.1f} MB; rclone mirror: "
              f"{report['mirror_mb']:.1f} MB (one day)"]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        return worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--change", type=float, default=0.01, help="share overwritten")
    parser.add_argument("--offsite", choices=("bucket", "dir"), default="bucket",
                        help="the offsite repository: a bucket on the same S3 server, or a "
                             "directory")
    # rclone (Debian) fails against a local S3 endpoint while AWS_CA_BUNDLE is set (DESIGN.md);
    # every contender runs without it.
    parser.add_argument("--ours-only", action="store_true",
                        help="scale runs: our engine alone (backup, verify, next night, "
                             "restore), no contender, no encryption")
    os.environ.pop("AWS_CA_BUNDLE", None)
    if "--ours-only" in sys.argv:
        return bench_main(parser, lambda args, work: scale_benchmark(args.objects, args.change,
                                                                     work),
                          render_scale, prefix="minio-bench-")
    return bench_main(parser, lambda args, work: benchmark(args.objects, args.change,
                                                           args.offsite, work),
                      render, prefix="minio-bench-")


if __name__ == "__main__":
    sys.exit(main())
