"""Data offsets for a custom-format archive that pg_dump wrote through a pipe.

pg_dump writes the archive's table of contents first and the table data after it. Writing to a
file, it seeks back at the end and records in each TOC entry where that entry's data block
starts; writing to a pipe (as our backups do, to stream) it cannot, and marks every offset "not
set". ``pg_restore --jobs`` then makes each worker read through the archive from the start of the
data to find its table, block after block: on the benchmark's 1.66 GB database that cost about
2 s of a 12 s restore.

:class:`BlockMarks` notes, while the archive is unpacked (it wraps the file being written),
where data blocks start: by the bytes that end the block before and start this one, an empty
chunk (five zero bytes), the block type ``BLK_DATA`` and a dump id (one C-speed ``find`` per
block written). :func:`set_data_offsets` then reads the header and the TOC (the layout of
``pg_backup_archiver.c`` ``ReadHead``/``ReadToc`` and ``pg_backup_custom.c``), matches each
entry with data to its block and overwrites each "not set" offset in place (same size). Table
data is COPY text, which never contains a zero byte, so after the TOC five zero bytes occur only
as that end mark: each table has exactly one mark, and a table with none or several leaves the
archive as it is. Large-object blocks hold arbitrary bytes, so an archive with any data other
than table data is left as it is, and so is one whose layout this module does not know (an
archive version outside 1.12 to 1.16, an integer size other than 4): pg_restore then finds the
blocks itself, as before. pg_restore also checks the block type and dump id it finds at each
offset and stops on a mismatch, so a wrong offset cannot restore wrong data.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MAGIC = b"PGDMP"
FORMAT_CUSTOM = 1
BLK_DATA = 1
OFFSET_NOT_SET, OFFSET_SET, OFFSET_NO_DATA = 1, 2, 3
KNOWN_VERSIONS = range(12, 17)  # 1.12 (PostgreSQL 11) .. 1.16 (PostgreSQL 17)
MARK = b"\x00" * 5 + bytes([BLK_DATA, 0])  # an empty chunk, then a block header (id follows)
MARKED = len(MARK) + 4
SCAN_CHUNK = 1024 * 1024


class _Layout(Exception):
    """The archive is not laid out as this module expects: leave it alone."""


class BlockMarks:
    """A writer that passes every block on to ``out`` and notes the (position, dump id) of each
    data block mark in the bytes written (see the module's doc)."""

    def __init__(self, out: IO[bytes] | None = None) -> None:
        self.out, self.written, self.tail = out, 0, b""
        self.found: list[tuple[int, int]] = []

    def write(self, block: bytes) -> int:
        if self.out is not None:
            self.out.write(block)
        if self.tail:  # a mark that starts in the last block and ends in this one
            seam, base = self.tail + block[:MARKED - 1], self.written - len(self.tail)
            at = seam.find(MARK)
            while 0 <= at < len(self.tail):
                if at + MARKED <= len(seam):
                    self._note(seam, at, base)
                at = seam.find(MARK, at + 1)
        at = block.find(MARK)
        while at >= 0:
            if at + MARKED <= len(block):
                self._note(block, at, self.written)
            at = block.find(MARK, at + 1)
        self.written += len(block)
        # the last bytes written, for a mark cut by the next block (a short block keeps some of
        # the tail before it)
        self.tail = (block if len(block) >= MARKED - 1 else self.tail + block)[-(MARKED - 1):]
        return len(block)

    def _note(self, data: bytes, at: int, base: int) -> None:
        self.found.append((base + at + 5, int.from_bytes(data[at + 7:at + MARKED], "little")))


@dataclass(frozen=True)
class _DataEntry:
    dump_id: int
    desc: str
    offset_at: int  # file position of this entry's offset flag


class _Reader:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.int_size = 4

    @property
    def pos(self) -> int:
        return self.f.tell()

    def take(self, n: int) -> bytes:
        raw = self.f.read(n)
        if len(raw) != n:
            raise _Layout("the archive ends inside its table of contents")
        return raw

    def byte(self) -> int:
        return self.take(1)[0]

    def integer(self) -> int:
        sign = self.byte()
        value = int.from_bytes(self.take(self.int_size), "little")
        return -value if sign else value

    def string(self) -> str | None:
        length = self.integer()
        if length < 0:
            return None
        return self.take(length).decode("utf-8", errors="replace")


def _read_toc(reader: _Reader) -> tuple[list[_DataEntry], int]:
    """The entries that have data, and the offset field size; after it, ``reader.pos`` is the
    first byte after the TOC, where the first data block starts."""
    if reader.f.read(5) != MAGIC:
        raise _Layout("not a custom-format archive")
    major, minor, _rev = reader.byte(), reader.byte(), reader.byte()
    if major != 1 or minor not in KNOWN_VERSIONS:
        raise _Layout(f"archive version 1.{minor} (major {major}) is not one this reads")
    reader.int_size = reader.byte()
    off_size = reader.byte()
    if reader.int_size != 4 or not 1 <= off_size <= 8:
        raise _Layout(f"integer size {reader.int_size}, offset size {off_size}")
    if reader.byte() != FORMAT_CUSTOM:
        raise _Layout("not a custom-format archive")
    if minor >= 15:
        reader.byte()  # compression algorithm
    else:
        reader.integer()  # compression level
    for _ in range(7):  # creation time: sec, min, hour, mday, mon, year, isdst
        reader.integer()
    for _ in range(3):  # database name, server version, pg_dump version
        reader.string()
    count = reader.integer()
    if count < 0:
        raise _Layout("negative TOC entry count")
    entries = []
    for _ in range(count):
        dump_id = reader.integer()
        had_dumper = reader.integer()
        reader.string()  # catalog id: table oid
        reader.string()  # catalog id: oid
        reader.string()  # tag
        desc = reader.string() or ""
        reader.integer()  # section
        for _ in range(5):  # defn, dropStmt, copyStmt, namespace, tablespace
            reader.string()
        if minor >= 14:
            reader.string()  # table access method
        if minor >= 16:
            reader.integer()  # relkind
        reader.string()  # owner
        reader.string()  # "with oids" ("false")
        while reader.string() is not None:  # dependencies, ended by a NULL string
            pass
        offset_at = reader.pos
        flag = reader.byte()
        reader.take(off_size)
        if flag not in (OFFSET_NOT_SET, OFFSET_SET, OFFSET_NO_DATA):
            raise _Layout(f"entry {dump_id}: data offset flag {flag}")
        if had_dumper and flag != OFFSET_NO_DATA:
            entries.append(_DataEntry(dump_id, desc, offset_at))
    return entries, off_size


def set_data_offsets(path: Path, marks: BlockMarks | None = None) -> str:
    """Write the data offsets into the archive at ``path`` (in place) when pg_dump could not;
    ``marks`` were noted while it was written (else the file is read once to find them).
    Returns what was done, for the log."""
    with open(path, "r+b") as f:
        try:
            entries, off_size = _read_toc(_Reader(f))
        except _Layout as exc:
            return f"data offsets left to pg_restore: {exc}"
        data_start = f.tell()
        if not entries:
            return "archive has no data blocks"
        f.seek(entries[0].offset_at)
        if f.read(1)[0] == OFFSET_SET:
            return "archive already has its data offsets"
        others = sorted({e.desc for e in entries if e.desc != "TABLE DATA"})
        if others:
            return f"data offsets left to pg_restore: the archive holds {', '.join(others)}"
        if marks is None:
            marks = BlockMarks()
            f.seek(0)
            for block in iter(lambda: f.read(SCAN_CHUNK), b""):
                marks.write(block)
        starts: dict[int, list[int]] = defaultdict(list)
        for at, dump_id in marks.found:
            if at >= data_start:
                starts[dump_id].append(at)
        f.seek(data_start)
        first = f.read(MARKED - 5)
        found: dict[int, int] = {entries[0].dump_id: data_start}
        if first != MARK[5:] + entries[0].dump_id.to_bytes(4, "little") or any(
                at != data_start for at in starts[entries[0].dump_id]):
            return "data offsets left to pg_restore: the first data block is not where expected"
        for entry in entries[1:]:
            if len(starts[entry.dump_id]) != 1:
                return (f"data offsets left to pg_restore: {len(starts[entry.dump_id])} "
                        f"candidate data blocks for entry {entry.dump_id}")
            found[entry.dump_id] = starts[entry.dump_id][0]
        for entry in entries:
            f.seek(entry.offset_at)
            f.write(bytes([OFFSET_SET]) + found[entry.dump_id].to_bytes(off_size, "little"))
    return f"data offsets written for {len(entries)} tables"

