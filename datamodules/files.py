"""Opening the data files of a split: footers, schemas and reads, with the Hive partition columns appended.

The second layer of the reader (``paths`` <- this module): every Parquet
read of the data module -- the in-memory store, streaming, feature inference,
encoder fitting and the footer checks at ``setup`` -- goes through
``ParquetReader``, so

* the partition values of a ``DataFile`` are part of its schema and are
  appended to every table read from it as constant columns
  (``pa.repeat`` of one scalar: no per-row Python);
* an Arrow error (a footer that is not Parquet, scrambled or truncated pages)
  becomes a ``ValueError`` naming the file, the column where there is one
  (found by reading the failed columns one at a time, on the error path only)
  and the problem; so does a column name that appears twice in a file, or a
  column that is both in the file and a partition key of its folder.

The errors are plain ``ValueError``s with one message argument, so they cross
DataLoader worker processes intact (PyTorch re-raises ``type(message)``).

A remote file (``DataFile.storage``, see ``datamodules.storage``) is opened
through its filesystem with ``pre_buffer=True`` (the column chunks a read
needs are fetched in a few coalesced ranged requests), and every open and read
is retried on transient errors: a read that fails part-way is done again on a
newly opened file (``iter_batches`` goes on after the batches it already
yielded); a file that keeps failing raises a ``ValueError`` naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from .paths import DataFile, Partition, as_data_file

READ_ERRORS = (pa.ArrowException, OSError)
T = TypeVar("T")


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip()}"


def partition_type(partition: Partition) -> pa.DataType:
    return pa.int64() if partition.dtype == "int64" else pa.string()


def check_unique(schema: pa.Schema, columns: Iterable[str], path: Path | DataFile) -> None:
    """Refuse a column of ``columns`` that appears more than once in ``schema`` (Arrow cannot tell which one to read)."""
    for name in columns:
        count = len(schema.get_all_field_indices(name))
        if count > 1:
            raise ValueError(f"{path}: column {name!r} appears {count} times in the file; column names must be unique "
                             "(rename or drop the copies)")


def type_kind(arrow_type: pa.DataType) -> str:
    """What a column holds, up to widths: ``integer``, ``floating``, ``string``, ``boolean``, ``list<...>``, or the type."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        return f"list<{type_kind(arrow_type.value_type)}>"
    if pa.types.is_integer(arrow_type):
        return "integer"
    if pa.types.is_floating(arrow_type):
        return "floating"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if pa.types.is_boolean(arrow_type):
        return "boolean"
    return str(arrow_type)


class ParquetReader:
    """One open data file: its footer, its schema with the partition columns, and reads that append them.

    Use as a context manager (or ``close()``): a reader keeps buffers of what it read.
    """

    def __init__(self, file: DataFile | str | Path) -> None:
        self.file = as_data_file(file)
        self.path = self.file.path
        self._source: Any = None  # the remote file object ``_parquet`` reads (closed with it)
        self._footer: tuple | None = None  # the footer part of ``signature()``
        try:
            self._parquet = self._open()
            file_schema = self._parquet.schema_arrow
        except READ_ERRORS as err:
            raise ValueError(f"{self.path}: cannot read the Parquet footer ({_describe(err)}); the file is not "
                             "Parquet, or is truncated or corrupt (rewrite it, or remove it from the split)") from err
        self._partitions = {p.name: p for p in self.file.partitions}
        for name in self._partitions:
            if name in file_schema.names:
                self.close()
                raise ValueError(f"{self.path}: column {name!r} is both in the file and a partition key of its folder "
                                 f"({name}=...); rename the column or the folder")
        self.schema = pa.schema(list(file_schema) + [pa.field(p.name, partition_type(p)) for p in self.file.partitions])
        self.metadata = self._parquet.metadata

    def _open(self) -> pq.ParquetFile:
        """The file's ``ParquetFile`` (footer read); a remote file is opened through its storage, with retries."""
        storage = self.file.storage
        if storage is None:
            return pq.ParquetFile(self.path)
        uri = str(self.path)

        def open_remote() -> pq.ParquetFile:
            source = storage.open_input(uri)
            try:
                parquet = pq.ParquetFile(source, pre_buffer=True)
            except BaseException:
                source.close()
                raise
            self._close_source()
            self._source = source
            return parquet

        return storage.call(uri, "reading the Parquet footer", open_remote)

    def _close_source(self) -> None:
        if self._source is not None:
            try:
                self._source.close()
            except READ_ERRORS:
                pass
            self._source = None

    def _retried(self, action: str, read: Callable[[], T]) -> T:
        """``read()`` (on ``self._parquet``), for a remote file tried again on a newly opened file after a transient error."""
        storage = self.file.storage
        if storage is None:
            return read()
        first = True

        def attempt() -> T:
            nonlocal first
            if not first:  # a failed read may leave the file object mid-request: start from a new one
                self._parquet.close()
                self._parquet = self._open()
            first = False
            return read()

        return storage.call(str(self.path), action, attempt)

    def __enter__(self) -> "ParquetReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._parquet.close()
        self._close_source()

    @property
    def num_rows(self) -> int:
        return self.metadata.num_rows

    def signature(self) -> tuple:
        """What identifies this version of the file: its size and modification time (local files), and its footer
        (size of the footer, rows, and each row group's rows and bytes). A file rewritten since has another one."""
        if self.file.storage is None:
            stat = Path(self.path).stat()
            where: tuple = (stat.st_size, stat.st_mtime_ns)
        else:
            size = getattr(self._source, "size", None)
            where = (size() if callable(size) else None,)
        if self._footer is None:  # read once per open file: the footer does not change under an open reader
            self._footer = (self.metadata.serialized_size, self.metadata.num_rows, tuple(
                (group.num_rows, group.total_byte_size) for group in
                (self.metadata.row_group(i) for i in range(self.metadata.num_row_groups))))
        return where + self._footer

    @property
    def num_row_groups(self) -> int:
        return self.metadata.num_row_groups

    def _file_columns(self, columns: Sequence[str]) -> list[str]:
        """The columns of ``columns`` stored in the file (partition columns are appended after reading)."""
        check_unique(self.schema, columns, self.path)
        missing = [c for c in columns if c not in self.schema.names]
        if missing:
            raise ValueError(f"{self.path}: missing column(s) {missing} (columns: {self.schema.names})")
        return [c for c in columns if c not in self._partitions]

    def _with_partitions(self, table: pa.Table, columns: Sequence[str]) -> pa.Table:
        for name in columns:
            partition = self._partitions.get(name)
            if partition is not None:
                kind = partition_type(partition)
                table = table.append_column(pa.field(name, kind), pa.repeat(pa.scalar(partition.value, kind), table.num_rows))
        return table

    def _read_error(self, err: BaseException, columns: Sequence[str], row_groups: Sequence[int] | None) -> ValueError:
        """A ``ValueError`` naming the file and, when one column alone fails to read, that column."""
        culprit = columns[0] if len(columns) == 1 else None
        if isinstance(err, ValueError) and not isinstance(err, pa.ArrowException):
            return err  # a remote read that kept failing: its message names the file already
        if len(columns) > 1:  # the error path only: read the columns one at a time to name the broken one
            groups = list(range(self.num_row_groups)) if row_groups is None else list(row_groups)
            try:
                with ParquetReader(self.file) as reader:
                    for name in columns:
                        try:
                            reader._parquet.read_row_groups(groups, columns=[name])
                        except READ_ERRORS:
                            culprit = name
                            break
            except (*READ_ERRORS, ValueError):
                pass
        where = f"column {culprit!r}: " if culprit else ""
        return ValueError(f"{self.path}: {where}cannot read the data ({_describe(err)}); the file is corrupt or "
                          "truncated (rewrite it, or remove it from the split)")

    def read_row_group(self, index: int, columns: Sequence[str]) -> pa.Table:
        """Row group ``index``, the given columns (partition columns included)."""
        stored = self._file_columns(columns)
        try:
            table = self._retried(f"reading row group {index}",
                                  lambda: self._parquet.read_row_group(index, columns=stored))
        except (*READ_ERRORS, ValueError) as err:
            raise self._read_error(err, stored, [index]) from err
        return self._with_partitions(table, columns)

    def read(self, columns: Sequence[str]) -> pa.Table:
        """The whole file, the given columns (partition columns included)."""
        stored = self._file_columns(columns)
        try:
            table = self._retried("reading the file", lambda: self._parquet.read(columns=stored))
        except (*READ_ERRORS, ValueError) as err:
            raise self._read_error(err, stored, None) from err
        return self._with_partitions(table, columns)

    def iter_batches(
        self, batch_size: int, columns: Sequence[str], row_groups: Sequence[int] | None = None
    ) -> Iterator[pa.Table]:
        """Tables of at most ``batch_size`` rows of the given row groups (all by default) and columns."""
        stored = self._file_columns(columns)
        groups = list(range(self.num_row_groups)) if row_groups is None else list(row_groups)
        # a remote file is read one row group at a time: pre_buffer fetches all the row groups of one call at once
        runs = [[g] for g in groups] if self.file.storage is not None else [groups]
        for run in runs:
            yield from self._iter_run(batch_size, columns, stored, run)

    def _iter_run(self, batch_size: int, columns: Sequence[str], stored: list[str], groups: list[int]
                  ) -> Iterator[pa.Table]:
        batches: Iterator[pa.RecordBatch] | None = None
        done = 0  # batches yielded: a retry on a new file skips them (the batches of one file are always the same)

        def next_batch() -> pa.RecordBatch | None:
            nonlocal batches
            if batches is None:
                batches = self._parquet.iter_batches(batch_size=batch_size, row_groups=groups, columns=stored)
                for _ in range(done):
                    next(batches)
            try:
                return next(batches)
            except StopIteration:
                return None
            except BaseException:
                batches = None
                raise

        while True:
            try:
                batch = self._retried(f"reading row groups {groups}", next_batch)
            except (*READ_ERRORS, ValueError) as err:
                raise self._read_error(err, stored, groups) from err
            if batch is None:
                return
            done += 1
            yield self._with_partitions(pa.Table.from_batches([batch]), columns)


def open_file(file: DataFile | str | Path) -> ParquetReader:
    """A ``ParquetReader`` of ``file`` (its footer read and checked)."""
    return ParquetReader(file)


def read_schema(file: DataFile | str | Path) -> pa.Schema:
    """The schema of ``file`` with its partition columns, from the footer."""
    with ParquetReader(file) as reader:
        return reader.schema


def read_column(file: DataFile | str | Path, name: str, like: tuple[DataFile | Path, pa.DataType] | None = None) -> pa.ChunkedArray:
    """Column ``name`` of ``file``; with ``like=(other_file, type)``, it must exist and hold the same kind of values."""
    with ParquetReader(file) as reader:
        if like is not None:
            other, expected = like
            if name not in reader.schema.names:
                raise ValueError(f"{reader.path}: missing column {name!r}, which {other} has "
                                 f"(columns: {reader.schema.names})")
            found = reader.schema.field(name).type if len(reader.schema.get_all_field_indices(name)) == 1 else None
            if found is not None and type_kind(found) != type_kind(expected):
                raise ValueError(f"{reader.path}: column {name!r} has type {found}, but {other} has {expected}; a "
                                 "column must hold the same kind of values (integers, floats, strings, lists of "
                                 "them) in every file")
        return reader.read([name]).column(name)
