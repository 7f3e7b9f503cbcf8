"""Errors that name the store, the partition and what to do next.

Every error raised by an engine or the repository is a ``RagBackupError``; the Dagster layer lets
them propagate so the run's failure message is the error's own text.
"""

from __future__ import annotations


class RagBackupError(Exception):
    """Base class of every error this project raises on purpose."""


class BackupNotFound(RagBackupError):
    """No committed backup exists for the requested store and partition."""


class BackupExpired(RagBackupError):
    """The backup existed but retention removed it, or the partition is outside the window."""


class BackupUnverified(RagBackupError):
    """The backup exists but has not passed verification."""


class IntegrityError(RagBackupError):
    """An artifact does not match its manifest (size, checksum, or content)."""


class StoreUnreachable(RagBackupError):
    """A store could not be reached or refused the credentials."""


class ConfirmationRequired(RagBackupError):
    """A destructive action was requested without the confirmation that names its target."""


class ToolError(RagBackupError):
    """An external tool (pg_dump, pg_restore, ...) failed; the message carries its stderr."""


class InvalidRequest(RagBackupError):
    """The request itself is malformed (a bad partition key, an unsafe name, ...)."""


class CredentialsRejected(RagBackupError):
    """The store answered but refused the login: not transient, so never retried."""


class StoreWentAway(ToolError, StoreUnreachable):
    """A tool failed because its store went away mid-way (restart, connection reset): transient,
    so retried like an unreachable store; the message still carries the tool's own text."""


class RepositoryError(RagBackupError):
    """The backup repository's storage failed: an S3 connection, timeout or server error, a full
    or read-only disk, an I/O error. The message names the operation, the location (and from it
    the store and partition) and carries the backend's own error text. ``transient`` errors (a
    connection, a timeout, a 5xx) are retried like an unreachable store; the others need an
    operator (free space, remount read-write, check the disk or the credentials)."""

    transient = False

    def __init__(self, message: str, *, operation: str = "", location: str = "",
                 store: str | None = None, partition: str | None = None,
                 backend_error: str = "", transient: bool | None = None) -> None:
        super().__init__(message)
        self.operation, self.location = operation, location
        self.store, self.partition, self.backend_error = store, partition, backend_error
        if transient is not None:
            self.transient = transient


class RepositoryUnavailable(RepositoryError):
    """A transient repository failure (connection refused or reset, timeout, HTTP 5xx)."""

    transient = True


class DamagedBackup(IntegrityError):
    """A record of a backup (its manifest or verification record) cannot be read or is invalid;
    the message names the file and the parse error. Only that partition is affected."""

    def __init__(self, message: str, *, file: str = "", error: str = "") -> None:
        super().__init__(message)
        self.file, self.error = file, error


class ConcurrentBackup(RagBackupError):
    """Another run committed (or is writing) the same partition while this one was writing; the
    message names that run. Nothing of either run was deleted by the other."""


class StoreBusy(RagBackupError):
    """Another writer (a Dagster run, the command line) holds the store's lease: a backup,
    retention or in-place restore of the same store must wait. The message names the holder
    and when its lease expires."""
