"""PostgreSQL: ``pg_dump -Fc`` per database on one exported snapshot, streamed through zstd;
verified with ``pg_restore --list``; restored one database at a time into a staging database
that is compared with the archive and the manifest before it takes the target's place.

One concern per module:

- ``common``: the store's name, the artifacts' names, the identifier limit, the log callback;
- ``server``: the server (``PostgresServer``: connection, client tools), the words of a refused
  login and of a server that went away, versions, databases, the credentials check;
- ``fingerprint``: the backup's fingerprint, typed (``PostgresFingerprint``,
  ``fingerprint_of``), and the row counting that makes it;
- ``backup``, ``verify``: the backup (databases and globals) and its verification;
- ``sqltext``: SQL text as pg_dump writes it (tokenizer, statement cursor);
- ``archive``: what an archive holds (its entries, its database-level properties);
- ``compare``: a database against an archive and the manifest (``compare_database``);
- ``roles``: the backup's roles (the globals) onto a server;
- ``restore``: the restore (staging database, comparison, swap-in);
- ``scratch``: dropping a scratch database.
"""

from rag_backup.engines.postgres.backup import (
    BackupOutcome,
    backup,
    dump_database,
    dump_globals,
)
from rag_backup.engines.postgres.common import (
    DUMP_SUFFIX,
    GLOBALS_ARTIFACT,
    MAX_IDENTIFIER,
    STORE,
    Log,
)
from rag_backup.engines.postgres.compare import compare_database
from rag_backup.engines.postgres.fingerprint import (
    DatabaseFingerprint,
    PostgresFingerprint,
    fingerprint_database,
    fingerprint_of,
)
from rag_backup.engines.postgres.restore import RestoreReport, restore
from rag_backup.engines.postgres.scratch import MAINTENANCE_DATABASES, drop_database
from rag_backup.engines.postgres.server import (
    AUTH_FAILURES,
    SERVER_WENT_AWAY,
    PostgresServer,
    check_credentials,
    list_databases,
    server_version,
    tool_version,
)
from rag_backup.engines.postgres.verify import verify
from rag_backup.errors import RagBackupError

__all__ = [
    "AUTH_FAILURES", "DUMP_SUFFIX", "GLOBALS_ARTIFACT", "MAINTENANCE_DATABASES",
    "MAX_IDENTIFIER", "SERVER_WENT_AWAY", "STORE", "BackupOutcome", "DatabaseFingerprint", "Log",
    "PostgresFingerprint", "PostgresServer", "RagBackupError", "RestoreReport", "backup",
    "check_credentials", "compare_database", "drop_database", "dump_database", "dump_globals",
    "fingerprint_database", "fingerprint_of", "list_databases", "restore", "server_version",
    "tool_version", "verify",
]
