"""Everything, wired together. It assembles; it does not compute."""

import dagster as dg

from rag_backup.defs import automation, catalog, milvus, minio, pitr, postgres, recovery, redis
from rag_backup.defs.resources import default_resources

STORES = [postgres, redis, milvus, minio]

defs = dg.Definitions.merge(
    *(store.defs for store in STORES),
    automation.build_defs([store.POLICY for store in STORES]),
    recovery.defs,
    pitr.defs,
    catalog.defs,
    dg.Definitions(resources=default_resources()),
)
