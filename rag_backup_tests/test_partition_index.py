"""The one use of Dagster's private storage schema (taking deleted partitions out of the
partition index) fails loudly here when a Dagster upgrade changes that schema."""

from __future__ import annotations

import dagster as dg

from rag_backup.defs import partition_index


def test_dagster_private_schema_still_has_what_the_partition_index_workaround_needs():
    problems = partition_index.private_schema_problems()
    assert problems == [], (
        "Dagster's private event-log schema changed (dagster " + dg.__version__ + "): "
        + "; ".join(problems) + ". rag_backup/defs/partition_index.py must be adapted before "
        "retention can take deleted partitions out of the UI.")


def test_oss_storage_still_cannot_wipe_single_partitions(tmp_path):
    """If this starts failing, Dagster OSS can wipe partitions itself: drop the workaround."""
    import pytest

    with dg.DagsterInstance.ephemeral(tempdir=str(tmp_path)) as instance:
        with pytest.raises(NotImplementedError):
            instance.wipe_asset_partitions(dg.AssetKey("x"), ["2026-11-30"])
