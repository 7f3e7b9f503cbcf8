"""Everything, wired together. It assembles; it does not compute."""

import dagster as dg

from rag_backup.defs import postgres, redis
from rag_backup.defs.resources import default_resources

defs = dg.Definitions.merge(
    postgres.defs,
    redis.defs,
    dg.Definitions(resources=default_resources()),
)
