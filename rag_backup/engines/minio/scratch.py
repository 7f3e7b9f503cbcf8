"""Removing a scratch bucket (the target of a restore or a drill) once it has been checked."""

from __future__ import annotations

from rag_backup.engines.minio.client import (
    S3Endpoint,
    _bucket_exists,
    check_bucket_name,
    repository_bucket,
    s3_errors,
)
from rag_backup.engines.minio.common import STORE
from rag_backup.errors import InvalidRequest, RagBackupError
from rag_backup.repository import BackupRepository


def remove_bucket(endpoint: S3Endpoint, bucket: str, *, repo: BackupRepository) -> bool:
    """Empty and delete ``bucket`` (a scratch target of a restore or a drill), one listing page
    at a time; True if it existed. The bucket holding ``repo`` is refused."""
    check_bucket_name(bucket)
    holder = repository_bucket(repo)
    if holder is not None and bucket == holder:
        raise InvalidRequest(f"{STORE}: bucket {bucket!r} holds the backup repository "
                             f"({repo.root_location}); removing it is refused (only scratch "
                             "targets of a restore are removed)")
    client = endpoint.client()
    if not _bucket_exists(client, endpoint, bucket, "removing a scratch bucket"):
        return False
    with s3_errors(endpoint, "removing a scratch bucket", bucket):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if not keys:
                continue
            failed = client.delete_objects(Bucket=bucket, Delete={"Objects": keys,
                                                                  "Quiet": True}).get("Errors")
            if failed:
                raise RagBackupError(
                    f"{endpoint.describe(bucket)}: {len(failed)} object(s) could not be "
                    f"deleted while removing the bucket, e.g. {failed[0].get('Key')!r}: "
                    f"{failed[0].get('Code')} {failed[0].get('Message', '')}".rstrip())
        client.delete_bucket(Bucket=bucket)
    return True
