"""One-shot MinIO bootstrap of the rag-backup deployment (the compose service ``minio-init``).

Idempotent; safe to run on every ``docker compose up``:

1. waits until MinIO answers;
2. creates the buckets that do not exist yet: ``documents`` and ``models`` (the RAG service's),
   ``backups`` (the runbook's layout), and the bucket of ``RAG_BACKUP_REPOSITORY`` when that is
   an ``s3://bucket/prefix`` URL;
3. when ``RAG_S3_ACCESS_KEY`` differs from the MinIO root user, creates or updates that MinIO
   user with ``RAG_S3_SECRET_KEY`` and attaches MinIO's built-in ``readwrite`` policy, so that
   rag-backup (and its run containers) never hold the root credentials.

Everything comes from the environment, nothing from the command line (a secret in argv is
visible to ``ps``):

    MINIO_ENDPOINT                           http://minio:9000
    MINIO_ROOT_USER, MINIO_ROOT_PASSWORD     MinIO's root credentials
    MINIO_BUCKETS                            default: documents,models,backups
    RAG_BACKUP_REPOSITORY                    s3://backups/rag-backup, or a directory
    RAG_S3_ACCESS_KEY, RAG_S3_SECRET_KEY     rag-backup's own MinIO user (optional)
    MINIO_INIT_TIMEOUT_S                     how long to wait for MinIO (default 120)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from urllib.parse import urlparse

DEFAULT_BUCKETS = ("documents", "models", "backups")
RAG_BACKUP_POLICY = "readwrite"


class InitError(RuntimeError):
    """The bootstrap cannot proceed; the message says what to fix."""


def required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise InitError(f"{name} is empty: set it in .env (see .env.example)")
    return value


def buckets_to_create(env: Mapping[str, str]) -> list[str]:
    """The configured buckets plus the repository's bucket, in order, without duplicates."""
    names = [b.strip() for b in env.get("MINIO_BUCKETS", ",".join(DEFAULT_BUCKETS)).split(",")]
    repository = env.get("RAG_BACKUP_REPOSITORY", "")
    if repository.startswith("s3://"):
        bucket = urlparse(repository).netloc
        if not bucket:
            raise InitError(f"RAG_BACKUP_REPOSITORY={repository!r} names no bucket "
                            "(expected s3://bucket/prefix)")
        names.append(bucket)
    return list(dict.fromkeys(n for n in names if n))


def endpoint_parts(url: str) -> tuple[str, bool]:
    """``http://minio:9000`` -> (``minio:9000``, secure=False)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InitError(f"MINIO_ENDPOINT={url!r} is not an http(s):// URL")
    return parsed.netloc, parsed.scheme == "https"


def wait_until_ready(client, timeout_s: float, sleep=time.sleep) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.list_buckets()
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet" until deadline
            if time.monotonic() >= deadline:
                raise InitError(f"MinIO did not answer within {timeout_s:.0f} s: {exc}") from exc
            sleep(2)


def ensure_buckets(client, names: Iterable[str]) -> list[str]:
    """Create the buckets that are missing; returns the ones created."""
    from minio.error import S3Error

    created = []
    for name in names:
        if client.bucket_exists(name):
            continue
        try:
            client.make_bucket(name)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            continue
        created.append(name)
    return created


def ensure_user(admin, access_key: str, secret_key: str, policy: str = RAG_BACKUP_POLICY) -> str:
    """Create or update the MinIO user ``access_key`` and attach ``policy`` unless attached."""
    admin.user_add(access_key, secret_key)  # creates, or resets the secret of an existing user
    info = json.loads(admin.user_info(access_key) or "{}")
    attached = {p.strip() for p in str(info.get("policyName") or "").split(",") if p.strip()}
    if policy in attached:
        return f"user {access_key}: secret set, policy {policy} already attached"
    admin.attach_policy([policy], user=access_key)
    return f"user {access_key}: secret set, policy {policy} attached"


def main(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    import urllib3
    from minio import Minio, MinioAdmin
    from minio.credentials import StaticProvider

    try:
        host, secure = endpoint_parts(required(env, "MINIO_ENDPOINT"))
        root_user = required(env, "MINIO_ROOT_USER")
        root_password = required(env, "MINIO_ROOT_PASSWORD")
        names = buckets_to_create(env)
        # Few retries per request: wait_until_ready is the retry loop, with its own deadline.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=60),
                                   retries=urllib3.Retry(total=1, backoff_factor=0.2))
        client = Minio(host, access_key=root_user, secret_key=root_password, secure=secure,
                       region=env.get("RAG_S3_REGION") or "us-east-1", http_client=http)
        wait_until_ready(client, float(env.get("MINIO_INIT_TIMEOUT_S") or 120))
        created = ensure_buckets(client, names)
        print(f"minio-init: buckets {', '.join(names)} present "
              f"(created now: {', '.join(created) or 'none'})")
        access_key = env.get("RAG_S3_ACCESS_KEY", "")
        if access_key and access_key != root_user:
            admin = MinioAdmin(endpoint=host, credentials=StaticProvider(root_user, root_password),
                               secure=secure)
            print("minio-init: " + ensure_user(admin, access_key,
                                               required(env, "RAG_S3_SECRET_KEY")))
        else:
            print("minio-init: rag-backup uses the root credentials (RAG_S3_ACCESS_KEY is the "
                  "root user or empty)")
    except InitError as exc:
        print(f"minio-init: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
