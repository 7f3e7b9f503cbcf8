"""One writer per store: the lease in the repository, on both backends (a directory and the
stack's S3 server, whose conditional writes make taking it atomic)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import dagster as dg
import pytest

from rag_backup.defs.common import retry_when_unreachable
from rag_backup.errors import StoreBusy
from rag_backup.repository import BackupRepository, FilesystemBackend
from rag_backup.repository import lease as lease_module

STACK_SERVICES = ("s3",)


def test_a_held_lease_refuses_a_second_writer_naming_the_holder(any_repo):
    with any_repo.lease("postgres", "Dagster run abc (postgres_backup_job)", "the backup of 1"):
        with pytest.raises(StoreBusy) as refused:
            with any_repo.lease("postgres", "rag-backup CLI", "retention"):
                pass
        said = str(refused.value)
        assert "Dagster run abc (postgres_backup_job)" in said and "the backup of 1" in said
        assert "until" in said
        with any_repo.lease("redis", "rag-backup CLI", "retention"):  # another store: free
            pass
    with any_repo.lease("postgres", "rag-backup CLI", "retention") as taken:  # released
        assert lease_module.current(any_repo.backend, "postgres").token == taken.record.token
    assert lease_module.current(any_repo.backend, "postgres") is None


def test_only_one_of_many_simultaneous_writers_gets_the_lease(any_repo):
    def take(i: int) -> str:
        try:
            lease = lease_module.acquire(any_repo.backend, "minio", f"writer {i}", "backup")
        except StoreBusy:
            return "refused"
        time.sleep(0.5)
        lease.release()
        return "took"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(take, range(8)))
    assert outcomes.count("took") == 1, outcomes


def test_the_holder_renews_and_a_dead_holders_lease_expires(any_repo):
    ttl = timedelta(seconds=1.5)
    with any_repo.lease("milvus", "long backup", "backup", ttl=ttl):
        time.sleep(3 * ttl.total_seconds())  # renewed in the background meanwhile
        with pytest.raises(StoreBusy, match="long backup"):
            lease_module.acquire(any_repo.backend, "milvus", "other", "backup", ttl)
    # A holder that stops renewing (crashed): its lease is taken over once expired.
    dead = lease_module.acquire(any_repo.backend, "milvus", "crashed run", "backup", ttl)
    dead._stop.set()
    with pytest.raises(StoreBusy, match="crashed run"):
        lease_module.acquire(any_repo.backend, "milvus", "other", "backup", ttl)
    time.sleep(ttl.total_seconds() + 0.5)
    taken = lease_module.acquire(any_repo.backend, "milvus", "other", "backup", ttl)
    try:
        assert lease_module.current(any_repo.backend, "milvus").holder == "other"
        dead.renew()  # the stalled holder learns it lost the lease; it never takes it back
        assert dead.lost and lease_module.current(any_repo.backend, "milvus").holder == "other"
    finally:
        taken.release()


def test_an_unreadable_lease_does_not_block_the_store_for_ever(any_repo):
    any_repo.backend.write_bytes("leases/redis.json", b"{not json")
    with any_repo.lease("redis", "rag-backup CLI", "backup"):
        doc = json.loads(any_repo.backend.read_bytes("leases/redis.json"))
        assert doc["holder"] == "rag-backup CLI"


def test_a_killed_process_holding_the_lease_releases_it_by_expiry(tmp_path):
    """A real holder process SIGKILLed: its lease stays until it expires, then is taken."""
    root = tmp_path / "repo"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from datetime import timedelta
        from rag_backup.repository import BackupRepository, FilesystemBackend
        repo = BackupRepository(FilesystemBackend({str(root)!r}))
        with repo.lease("postgres", "holder process", "backup", ttl=timedelta(seconds=2)):
            print("held", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, env=dict(os.environ))
    try:
        assert holder.stdout.readline().strip() == b"held"
        repo = BackupRepository(FilesystemBackend(root))
        with pytest.raises(StoreBusy, match="holder process"):
            lease_module.acquire(repo.backend, "postgres", "cli", "backup")
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        deadline = time.monotonic() + 10
        while True:
            try:
                with repo.lease("postgres", "cli", "backup"):
                    break
            except StoreBusy:
                assert time.monotonic() < deadline, "the dead holder's lease never expired"
                time.sleep(0.3)
    finally:
        if holder.poll() is None:
            holder.kill()


def test_dagster_retries_a_run_refused_by_a_busy_store():
    """A Dagster backup refused by the command line's lease is retried later, not failed."""
    with pytest.raises(dg.RetryRequested):
        with retry_when_unreachable():
            raise StoreBusy("postgres is busy: rag-backup CLI holds the postgres lease")
