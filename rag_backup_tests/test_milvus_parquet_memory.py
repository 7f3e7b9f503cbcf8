"""The Milvus engine's Parquet reader (``iter_parquet``, what restore and verify read with) holds
about one batch whatever the file's size, both for files as the backup writes them (a row group
per batch) and for a file of one large row group. No server: the files are written here.

Measured by the Arrow memory pool (``pa.total_allocated_bytes``, exact and not timed), sampled
at every batch: pyarrow's default pre-buffering kept the whole file's column chunks allocated
while it was iterated (the 46 MB file below peaked at more than its size); a column chunk read
whole kept a whole row group allocated (the one-row-group copy: the file's size again). Read
with ``iter_parquet`` now: about 3 MB and 7 MB (pages, and the dictionary pages of the copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rag_backup.engines.milvus.parquet import iter_parquet, write_parquet

DIM = 128
ROWS = 96_000  # 49 MB of float32 vectors (random: zstd does not shrink them)
WRITE_BATCH = 2000  # the backup writes a row group per batch: ~1 MB each here
READ_BATCH = 500
BOUND = 12 * 1024 * 1024  # a quarter of the file; a read batch is ~0.3 MB
SCHEMA = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), DIM)),
                    ("text", pa.string()), ("$meta", pa.string())])


def _batches() -> Iterator[pa.RecordBatch]:
    rng = np.random.default_rng(7)
    for start in range(0, ROWS, WRITE_BATCH):
        vectors = rng.standard_normal((WRITE_BATCH, DIM), dtype=np.float32)
        yield pa.RecordBatch.from_arrays([
            pa.array(np.arange(start, start + WRITE_BATCH), pa.int64()),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
            pa.array([f"चंक {i} of the corpus" for i in range(start, start + WRITE_BATCH)]),
            pa.array(['{"lang": "hi"}'] * WRITE_BATCH),
        ], schema=SCHEMA)


class _Directory:
    """What ``write_parquet`` writes into (a pending backup's ``artifact``), as plain files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def artifact(self, name: str) -> Iterator[BinaryIO]:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            yield out


def _peak_while_reading(path: Path) -> tuple[int, int]:
    """Rows read and the most Arrow memory allocated beyond the start at any batch."""
    start, peak, rows = pa.total_allocated_bytes(), 0, 0
    for batch in iter_parquet(path, SCHEMA, READ_BATCH, str(path)):
        rows += batch.num_rows
        peak = max(peak, pa.total_allocated_bytes() - start)
    return rows, peak


@pytest.fixture(scope="module")
def as_backed_up(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parquet")
    files = write_parquet(_Directory(root), "c/_all", _batches(), SCHEMA,  # type: ignore[arg-type]
                          rows_per_file=ROWS)
    assert files == {"c/_all/part-00000.parquet": ROWS}
    return root / "c/_all/part-00000.parquet"


def test_reading_a_backup_file_holds_a_batch_not_the_file(as_backed_up: Path):
    size = as_backed_up.stat().st_size
    assert size > 3 * BOUND
    assert pq.ParquetFile(as_backed_up).metadata.num_row_groups == ROWS // WRITE_BATCH
    rows, peak = _peak_while_reading(as_backed_up)
    assert rows == ROWS
    assert peak < BOUND, f"reading {size} bytes in {READ_BATCH}-row batches held {peak} bytes"


def test_one_large_row_group_reads_in_the_same_bound(as_backed_up: Path, tmp_path: Path):
    single = tmp_path / "one-row-group.parquet"
    pq.write_table(pq.read_table(as_backed_up), single, row_group_size=ROWS,
                   compression="zstd", write_page_checksum=True,
                   use_dictionary=["id", "text", "$meta"])  # as write_parquet: not the vectors
    assert pq.ParquetFile(single).metadata.num_row_groups == 1
    rows, peak = _peak_while_reading(single)
    assert rows == ROWS
    assert peak < BOUND, f"reading one {ROWS}-row row group held {peak} bytes"
