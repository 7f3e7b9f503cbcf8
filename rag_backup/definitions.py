"""Everything, wired together. It assembles; it does not compute."""

import dagster as dg

from rag_backup.defs import postgres
from rag_backup.defs.resources import default_resources

defs = dg.Definitions.merge(
    postgres.defs,
    dg.Definitions(resources=default_resources()),
)
