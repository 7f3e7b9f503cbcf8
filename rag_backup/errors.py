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
