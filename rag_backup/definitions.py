"""Everything, wired together. It assembles; it does not compute."""

import dagster as dg

from rag_backup.defs import (
    automation,
    catalog,
    keys,
    milvus,
    minio,
    offsite,
    pitr,
    postgres,
    recovery,
    redis,
)
from rag_backup.defs.resources import default_resources

STORES = [postgres, redis, milvus, minio]

# Every job runs its steps in the run's own process: a store's chain (backup, verification,
# retention) is sequential anyway, and a new process per step cost ~5 s each. A run is still
# one process (a container with the Docker run launcher), so a crash takes one run, no more.
EXECUTOR = dg.in_process_executor

defs = dg.Definitions.merge(
    *(store.defs for store in STORES),
    automation.build_defs([store.POLICY for store in STORES]),
    offsite.build_defs([store.POLICY for store in STORES]),
    recovery.defs,
    pitr.defs,
    catalog.defs,
    keys.defs,
    dg.Definitions(resources=default_resources(), executor=EXECUTOR),
)
