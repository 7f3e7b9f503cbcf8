"""Encryption at rest in the repository layer, on a directory and on the real S3 server: the
age format (checked against the stock ``age`` tool both ways), encrypted artifacts and blobs,
headers beside payloads, tampering, missing and wrong keys, turning encryption on for a
repository that has clear backups, and rotation rewriting headers only.

The stores' own backups, restores and the CLI run encrypted in ``test_cli.py`` (every store,
with a scan of every byte for plaintext, and rotation), ``test_pitr.py`` (WAL archive, base
backups, point-in-time restores) and ``test_offsite.py`` (the offsite copy)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rag_backup.errors import DamagedBackup, IntegrityError
from rag_backup.repository import BackupRepository, FilesystemBackend
from rag_backup.repository import crypto
from rag_backup.repository.crypto import (
    DecryptionError,
    Identity,
    IdentityError,
    Recipient,
)
from rag_backup.repository.manifest import BackupOutcome
from rag_backup.repository.rotation import rotate
from rag_backup.repository.sealed import KEY_RECORD, Crypto

STACK_SERVICES = ("s3",)
PARTITION = "2026-11-30"
AGE = shutil.which("age")


def keyed(repo: BackupRepository, keys: Crypto) -> BackupRepository:
    """The same storage opened with other keys."""
    return BackupRepository(repo.storage, keys)


def backup(repo: BackupRepository, data: bytes, partition: str = PARTITION,
           store: str = "teststore"):
    with repo.begin(store, partition, "run-1") as pending:
        with pending.artifact("data.bin") as out:
            out.write(data)
        pending.commit(BackupOutcome({"rows": 3, "secret_name": "alpha"}, {"t": "1"}, "v1"))
    return repo.get(store, partition)


def read(repo: BackupRepository, record) -> bytes:
    chunks: list[bytes] = []
    repo.stream_artifact(record, record.manifest.artifacts[0], chunks.append)
    return b"".join(chunks)


def stored(repo: BackupRepository, key: str) -> bytes:
    return repo.storage.read_bytes(key)


@pytest.fixture
def key() -> Identity:
    return Identity.generate()


@pytest.fixture
def repo(any_repo: BackupRepository, key: Identity) -> BackupRepository:
    return keyed(any_repo, Crypto([key.recipient], [key]))


def test_an_artifact_is_stored_encrypted_and_read_back(repo):
    data = os.urandom(200_000) + b"known plaintext value" * 1000
    record = backup(repo, data)
    key = f"teststore/{PARTITION}/{record.backup_id}/data.bin"
    payload, header = stored(repo, key), stored(repo, key + ".age")
    assert b"known plaintext value" not in payload and header.startswith(
        b"age-encryption.org/v1\n")
    assert len(payload) == crypto.payload_size(len(data))
    assert read(repo, record) == data
    assert [f.size for f in repo.backend.list_files(f"teststore/{PARTITION}/{record.backup_id}")
            ] == [len(data)]  # the plaintext's size; the header is not listed
    raw = stored(repo, f"teststore/{PARTITION}/manifest.json")
    assert b"alpha" not in raw and b'"sealed"' in raw
    assert record.manifest.fingerprint == {"rows": 3, "secret_name": "alpha"}
    assert stored(repo, KEY_RECORD) and b"AGE-SECRET" not in stored(repo, KEY_RECORD)


@pytest.mark.skipif(AGE is None, reason="the age command is not installed")
def test_the_format_is_age_both_ways(tmp_path, key):
    identity = tmp_path / "key.txt"
    identity.write_text(key.encode() + "\n")
    for size in (0, 1, 65536, 65537, 300_000):
        data = os.urandom(size)
        ours = crypto.encrypt_bytes(data, [key.recipient, Identity.generate().recipient])
        done = subprocess.run([AGE, "-d", "-i", str(identity)], input=ours,
                              capture_output=True, timeout=60)
        assert done.returncode == 0 and done.stdout == data, done.stderr
        theirs = subprocess.run([AGE, "-r", str(key.recipient)], input=data,
                                capture_output=True, timeout=60, check=True).stdout
        assert crypto.decrypt_bytes(theirs, [key], "age's") == data


def test_blobs_are_encrypted_deduplicated_and_collected_with_their_headers(repo, monkeypatch):
    import rag_backup.repository.blobs as blobs
    from datetime import timedelta

    monkeypatch.setattr(blobs, "SMALL_BLOB", 1000)  # the streamed path (temporary + rename)
    writer = repo.blobs.writer("20261130T000000Z-00000000")
    small, large = b"small blob" * 10, os.urandom(5000)
    sha_small, _ = writer.put([small], len(small))
    sha_large, _ = writer.put([large[:2000], large[2000:]], len(large))
    again = repo.blobs.writer("20261130T000001Z-00000000").put([small], len(small))[0]
    assert again == sha_small == hashlib.sha256(small).hexdigest()
    assert repo.blobs.sizes() == {bytes.fromhex(sha_small): len(small),
                                  bytes.fromhex(sha_large): len(large)}
    assert repo.blobs.check(sha_large, len(large)) == (None, len(large))
    assert small not in stored(repo, blobs.blob_key(sha_small))
    assert not list(repo.storage.list_files(blobs.TMP_PREFIX))  # renamed with its header
    found = repo.blobs.collect({sha_small}, grace=timedelta(0))
    assert found.blobs_deleted == 1
    assert [f.key for f in repo.storage.list_files(blobs.BLOB_PREFIX)] == [
        blobs.blob_key(sha_small), blobs.blob_key(sha_small) + ".age"]


def test_tampered_ciphertext_and_headers_are_refused(repo):
    data = os.urandom(150_000)
    record = backup(repo, data)
    key = f"teststore/{PARTITION}/{record.backup_id}/data.bin"
    payload, header = stored(repo, key), stored(repo, key + ".age")
    flipped = bytearray(payload)
    flipped[100_000] ^= 1
    repo.storage.write_bytes(key, bytes(flipped))
    with pytest.raises(DecryptionError, match="chunk 1 of the encrypted payload"):
        read(repo, record)
    repo.storage.write_bytes(key, payload[:-10])
    with pytest.raises(IntegrityError):
        read(repo, record)
    repo.storage.write_bytes(key, payload)
    repo.storage.write_bytes(key + ".age", header.replace(b"--- ", b"--- A", 1)[:-2] + b"\n")
    with pytest.raises(DecryptionError):
        read(repo, record)
    repo.storage.write_bytes(key + ".age", header)
    assert read(repo, record) == data


def test_a_missing_or_wrong_identity_is_refused_by_name(repo, key):
    record = backup(repo, b"x" * 1000)
    writer_only = keyed(repo, Crypto([key.recipient], []))  # the backup side: public key only
    listed = writer_only.get("teststore", PARTITION)
    assert listed.backup_id == record.backup_id and listed.manifest.fingerprint == {}
    with pytest.raises(IdentityError, match="RAG_BACKUP_IDENTITY"):
        read(writer_only, listed)
    other = Identity.generate()
    wrong = keyed(repo, Crypto([], [other]))
    with pytest.raises(IdentityError, match="not encrypted to the configured identity") as err:
        read(wrong, wrong.get("teststore", PARTITION))
    assert other.encode() not in str(err.value) and str(other.recipient) in str(err.value)
    assert "AGE-SECRET" not in repr(other)


def test_turning_encryption_on_keeps_clear_backups_readable_and_refuses_a_clear_manifest(
        any_repo, key):
    clear = backup(any_repo, b"before", partition="2026-11-29")
    repo = keyed(any_repo, Crypto([key.recipient], [key]))
    backup(repo, b"after")
    assert read(repo, repo.get("teststore", "2026-11-29")) == b"before"
    assert read(repo, repo.get("teststore", PARTITION)) == b"after"
    # a manifest replaced by a clear one after encryption was on is refused
    forged = clear.manifest.to_json().replace(b"2026-11-29", PARTITION.encode())
    forged = forged.replace(clear.manifest.started_at.isoformat().encode(),
                            b"2099-01-01T00:00:00+00:00")
    repo.storage.write_bytes(f"teststore/{PARTITION}/manifest.json", forged)
    with pytest.raises(DamagedBackup, match="not sealed"):
        repo.get("teststore", PARTITION)
    assert [d.partition_key for d in repo.scan("teststore").damaged] == [PARTITION]


def test_rotation_rewraps_headers_only_resumes_and_retires_the_old_key(repo, key):
    records = [backup(repo, os.urandom(70_000), partition=p)
               for p in ("2026-11-28", "2026-11-29", PARTITION)]
    payload_keys = [f"teststore/{r.partition_key}/{r.backup_id}/data.bin" for r in records]
    before = {k: stored(repo, k) for k in payload_keys}
    new = Identity.generate()
    lines: list[str] = []
    report = rotate(repo, add=[new.recipient], remove=[key.recipient],
                    identities=[key, new], log=lines.append)
    assert report.ok and report.files_rewrapped == 3 and report.manifests_rewrapped == 3
    assert report.backups_rewrapped == 3
    assert report.payload_bytes_not_rewritten == sum(map(len, before.values()))
    assert {k: stored(repo, k) for k in payload_keys} == before
    assert "rotation done" in lines[-1]
    rotated = keyed(repo, Crypto([new.recipient], [new]))
    for r in records:
        assert len(read(rotated, rotated.get("teststore", r.partition_key))) == 70_000
        assert rotated.get("teststore", r.partition_key).manifest.fingerprint["rows"] == 3
    old = keyed(repo, Crypto([], [key]))
    with pytest.raises(IdentityError):
        read(old, old.get("teststore", PARTITION))
    again = rotate(rotated, add=[new.recipient], identities=[new], log=lines.append)
    assert again.ok and again.files_rewrapped == 0 and again.files_already_rewrapped == 6
    with pytest.raises(IdentityError, match="removed"):  # a writer still set to the old key
        backup(keyed(repo, Crypto([key.recipient], [key])), b"late")


def test_keys_come_from_text_or_files_and_bad_keys_are_named_without_the_secret(tmp_path):
    key = Identity.generate()
    path = tmp_path / "id.txt"
    path.write_text(f"# a comment\n{key.encode()}\n")
    keys = Crypto.from_env({"RAG_BACKUP_ENCRYPT_TO": f"{key.recipient}, "
                                                     f"{Identity.generate().recipient}",
                            "RAG_BACKUP_IDENTITY": str(path)})
    assert keys.identities == [key] and len(keys.recipients) == 2
    assert Crypto.from_env({}) is None
    assert Recipient.parse(str(key.recipient)) == key.recipient
    with pytest.raises(Exception, match="not an age public key"):
        Recipient.parse("age1notakey")
    with pytest.raises(Exception) as err:
        Crypto.from_env({"RAG_BACKUP_IDENTITY": key.encode()[:-3] + "QQQ"})
    assert key.encode()[:20] not in str(err.value)
    with pytest.raises(Exception, match="neither an age key nor a readable file"):
        Crypto.from_env({"RAG_BACKUP_IDENTITY": str(tmp_path / "missing")})


def test_a_repository_without_keys_reads_and_writes_in_clear(tmp_path):
    repo = BackupRepository(FilesystemBackend(tmp_path / "clear"))
    record = backup(repo, b"plain")
    assert not list(Path(tmp_path / "clear").rglob("*.age"))
    assert read(repo, record) == b"plain"


def test_the_rotation_job_rewraps_from_dagster_and_reports_in_metadata(tmp_path, key):
    from rag_backup.defs.keys import rotate_keys_job
    from rag_backup.defs.resources import BackupRepositoryResource

    repo = BackupRepository(FilesystemBackend(tmp_path / "repo"),
                            Crypto([key.recipient], [key]))
    backup(repo, os.urandom(10_000))
    new = Identity.generate()
    both = tmp_path / "both.txt"
    both.write_text(f"{key.encode()}\n{new.encode()}\n")
    resource = BackupRepositoryResource(location=str(tmp_path / "repo"),
                                        encrypt_to=str(new.recipient), identity=str(both))
    config = {"ops": {"rotate_keys": {"config": {"add": [str(new.recipient)],
                                                 "remove": [str(key.recipient)]}}}}
    result = rotate_keys_job.execute_in_process(run_config=config,
                                                resources={"repository": resource})
    [event] = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = event.event_specific_data.metadata
    assert metadata["primary_ok"].value is True
    assert metadata["primary_files_rewrapped"].value == 1
    assert metadata["primary_payload_bytes_not_rewritten"].value > 10_000
    assert key.encode() not in str(metadata) and new.encode() not in str(metadata)
    rotated = keyed(repo, Crypto([], [new]))
    assert len(read(rotated, rotated.get("teststore", PARTITION))) == 10_000
