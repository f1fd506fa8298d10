"""Raw categorical columns to ids, fitted on the training split: ``VocabularyEncoder`` and ``HashingEncoder``.

Raw categorical columns (strings or integers of any range) become int64 ids
that a ``SparseFeature`` can embed:

* ``VocabularyEncoder(min_freq=1, max_size=None)``: the values seen at least
  ``min_freq`` times in the training split get ids ``1 .. n`` (most frequent
  first, ties broken by value, so the mapping is deterministic); everything else
  -- values seen too rarely, values first met in val/test/predict, nulls --
  gets the out-of-vocabulary id ``0``. ``num_ids = n + 1``.
* ``HashingEncoder(num_buckets)``: a value's id is ``1 + h(value) mod
  (num_buckets - 1)`` with ``h`` pandas' stable 64-bit hash (the same in every
  process and run); nulls get id ``0``. Nothing is learnt, so unseen values
  need no special case. ``num_ids = num_buckets``.

Incremental training (``ParquetDataModule(grow_vocabulary=True)``): a
vocabulary restored from a checkpoint grows on the next train split
(``VocabularyEncoder.grow``). Every value keeps its id; a value not in the
vocabulary that the new split holds at least ``min_freq`` times gets a new id
after the existing ones (most frequent first, ties by value). With
``max_size``, the vocabulary never holds more than ``max_size`` values: when
the newcomers do not fit, existing values and newcomers are ranked together by
their count -- cumulative over every split trained on for an existing value
(the vocabulary keeps these counts), the new split's for a newcomer -- with
existing values first on ties, then lower ids / more frequent newcomers; the
top ``max_size`` stay. An existing value that falls out is evicted (it maps
to the out-of-vocabulary id 0 from then on, and its count is forgotten) and its
id is given to an admitted newcomer (the smallest freed id to the most frequent
newcomer), whose embedding row the model then starts afresh. ``grow`` returns,
for each id of the grown vocabulary, the id the same value had before, or -1
for a new value: what the model needs to resize its tables.

List columns. A raw ``list<string>`` or ``list<int>`` column (a behaviour
history) is encoded value by value: every value of every list gets the id its
vocabulary (or hash) gives, in place, so ``["b", "zz", "a"]`` becomes ``[2, 0,
1]`` (an unseen or null value becomes id 0, which a ``SequenceFeature`` reads
as padding); a null list stays null (the data module refuses it: give an empty
list). Fitting counts every value of every list.

Shared vocabularies. ``{"vocabulary_of": "item_id"}`` makes a column use
another categorical column's encoder (``SharedVocabulary``): ``hist_item``'s
ids are then ``item_id``'s ids, so its ``SequenceFeature`` can read
``item_id``'s embedding table (``shared_with="item_id"``). The vocabulary is
fitted on the union of both columns' training values: a value counts once per
occurrence, as a candidate or inside any history, and ``min_freq`` /
``max_size`` apply to that sum (an item clicked often but rarely shown as a
candidate still gets its own id and row). It grows and evicts as one
vocabulary, counting both columns, so the two columns never disagree on an id.

Every encoder's ``state_dict()`` is plain Python data; the data module puts it
in its own ``state_dict`` so that checkpoints carry it (a shared one holds only
``{"kind": "shared", "vocabulary_of": column}``).

The rest of the preprocessing lives beside this module: ``datamodules.dense``
(``DenseNormalizer``, ``MissingFiller``) and ``datamodules.fitting`` (the
streaming pass that fits all of them). Their names are also importable from
here, where they used to live.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .dense import (  # noqa: F401  (re-exported: these used to live here)
    MISSING_INDICATOR_SUFFIX, DenseNormalizer, MissingFiller, dense_with_missing, fill_table, filler_from_state,
    make_fillers,
)
from .fitting import FIT_READ_ROWS, fit_preprocessing, grow_vocabularies, iter_chunks  # noqa: F401  (re-exported)

_MERGE_EVERY = 16


def is_list_type(dtype: pa.DataType) -> bool:
    """Whether ``dtype`` is a list type (``list``, ``large_list`` or ``fixed_size_list``)."""
    return pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)


def _one_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return pa.array([], column.type)
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def _lists(column: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array, pa.Array]:
    """A list column as ``(values, offsets from 0, null mask)``: ``values`` every value of every list, in order."""
    column = _one_array(column)
    if pa.types.is_fixed_size_list(column.type):
        column = column.cast(pa.list_(column.type.value_type))
    offsets = column.offsets
    first, last = offsets[0].as_py(), offsets[-1].as_py()
    values = column.values.slice(first, last - first)
    return values, pc.subtract(offsets, pa.scalar(first, offsets.type)), column.is_null()


def map_list_values(column: pa.Array | pa.ChunkedArray, function: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """A list column with ``function`` applied to the values of all its lists at once (one array in, one array of
    the same length out): the same lists, null lists kept null. A ``fixed_size_list`` comes back as a ``list``."""
    column = _one_array(column)
    flat, offsets, nulls = _lists(column)
    values = function(flat)
    if pa.types.is_large_list(column.type):
        return pa.LargeListArray.from_arrays(offsets, values, mask=nulls)
    return pa.ListArray.from_arrays(offsets, values, mask=nulls)


def _plain_array(column: pa.Array | pa.ChunkedArray, name: str, where: str) -> pa.Array:
    """A column as one ``int64`` or ``string`` array (dictionary-encoded columns are decoded; whole-number floats,
    integer ids written as floats, become ``int64``, NaN null); a list column gives the values of its lists."""
    column = _one_array(column)
    if is_list_type(column.type):
        column = _lists(column)[0]
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    ctype = column.type
    if pa.types.is_integer(ctype):
        return column.cast(pa.int64())
    if pa.types.is_floating(ctype):  # integer ids written as floats: whole numbers only (NaN is null)
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, ctype), column)
        try:
            return column.cast(pa.int64())  # a safe cast: a fraction or an overflow raises
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise TypeError(f"{where}: categorical column {name!r} has type {ctype} and values that are not whole "
                            "numbers; a raw categorical must hold strings or integers (integer ids written as floats "
                            "are accepted)") from None
    if pa.types.is_string(ctype) or pa.types.is_large_string(ctype):
        return column.cast(pa.string())
    raise TypeError(
        f"{where}: categorical column {name!r} has type {ctype}; a raw categorical must hold strings or integers "
        "(or lists of them)"
    )


class CategoricalEncoder:
    """Maps one raw categorical column to ids in ``[0, num_ids)``; id 0 is out-of-vocabulary / null."""

    kind = ""
    #: whether the encoder learns its mapping from the train split (a vocabulary, which can also grow)
    learns = False

    def __init__(self, column: str) -> None:
        self.column = column

    @property
    def fitted(self) -> bool:
        return True

    @property
    def num_ids(self) -> int:
        raise TypeError(f"{type(self).__name__} must define num_ids")

    def partial_fit(self, values: pa.Array, where: str, column: str | None = None) -> None:
        """Account for one chunk of training values (encoders that learn nothing ignore it).

        ``column`` names the column the values come from in messages (default: the encoder's own).
        """

    def finish_fit(self) -> None:
        """Turn what ``partial_fit`` gathered into the mapping."""

    def transform(self, values: pa.Array | pa.ChunkedArray, where: str, column: str | None = None) -> np.ndarray:
        """The int64 ids of ``values`` (a list column: of every value of its lists, in order)."""
        raise TypeError(f"{type(self).__name__} must define transform")

    def encode(self, values: pa.Array | pa.ChunkedArray, where: str, column: str | None = None) -> pa.Array:
        """``values`` as an int64 array of ids; a list column as a ``list<int64>`` of the same shape (see the
        module docstring)."""
        values = _one_array(values)
        if not is_list_type(values.type):
            return pa.array(self.transform(values, where, column), pa.int64())
        return map_list_values(values, lambda flat: pa.array(self.transform(flat, where, column), pa.int64()))

    def state_dict(self) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} must define state_dict")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise TypeError(f"{type(self).__name__} must define load_state_dict")


class VocabularyEncoder(CategoricalEncoder):
    """Ids ``1..n`` for values seen ``>= min_freq`` times in training (at most ``max_size``), ``0`` otherwise."""

    kind = "vocabulary"
    learns = True

    def __init__(self, column: str, min_freq: int = 1, max_size: int | None = None) -> None:
        super().__init__(column)
        if int(min_freq) < 1:
            raise ValueError(f"categorical column {column!r}: min_freq must be >= 1, got {min_freq}")
        if max_size is not None and int(max_size) < 1:
            raise ValueError(f"categorical column {column!r}: max_size must be >= 1 or None, got {max_size}")
        self.min_freq = int(min_freq)
        self.max_size = None if max_size is None else int(max_size)
        self.values: pa.Array | None = None  # kept values in id order (id = position + 1)
        self.counts: np.ndarray | None = None  # int64, each value's count over the splits fitted or grown on
        self._counts: list[pa.Table] = []

    @property
    def fitted(self) -> bool:
        return self.values is not None

    @property
    def num_ids(self) -> int:
        if self.values is None:
            raise ValueError(f"the vocabulary of column {self.column!r} is not fitted yet")
        return len(self.values) + 1

    def partial_fit(self, values: pa.Array, where: str, column: str | None = None) -> None:
        column = column or self.column
        values = _plain_array(values, column, where)
        if self._counts and self._counts[0].schema.field("value").type != values.type:
            shared = f" (it shares the vocabulary of {self.column!r})" if column != self.column else ""
            raise ValueError(
                f"{where}: categorical column {column!r}{shared} holds {values.type} values, but the training "
                f"files read before it hold {self._counts[0].schema.field('value').type}; give it one type in every "
                "file (and the same type as every column sharing its vocabulary)"
            )
        counted = pc.value_counts(values.drop_null())
        self._counts.append(pa.table({"value": counted.field("values"), "count": counted.field("counts")}))
        if len(self._counts) >= _MERGE_EVERY:
            self._counts = [self._merge()]

    def _merge(self) -> pa.Table:
        table = pa.concat_tables(self._counts)
        merged = table.group_by("value").aggregate([("count", "sum")])
        return pa.table({"value": merged["value"], "count": merged["count_sum"]})

    def finish_fit(self) -> None:
        if not self._counts:
            raise ValueError(f"categorical column {self.column!r}: the training split holds no value to fit on")
        merged = self._merge()
        value_type = merged.schema.field("value").type
        kept = merged.filter(pc.greater_equal(merged["count"], self.min_freq))
        kept = kept.sort_by([("count", "descending"), ("value", "ascending")])
        if self.max_size is not None:
            kept = kept.slice(0, self.max_size)
        self.values = kept["value"].combine_chunks() if kept.num_rows else pa.array([], value_type)
        self.counts = kept["count"].to_numpy().astype(np.int64) if kept.num_rows else np.zeros(0, np.int64)
        self._counts = []

    def grow(self) -> np.ndarray:
        """Extend the vocabulary with what ``partial_fit`` counted since (a new train split); see the module docstring.

        Returns ``sources``: for each id ``j`` of the grown vocabulary (``0`` to
        ``num_ids - 1``), the id its value had before, or ``-1`` for a value
        that is new to that id (a newcomer, possibly in an evicted value's id).
        ``sources[0] == 0``: the out-of-vocabulary id stays.
        """
        if self.values is None or self.counts is None:
            raise ValueError(f"the vocabulary of column {self.column!r} is not fitted yet; nothing to grow")
        old = len(self.values)
        counts = self.counts.copy()
        if self._counts:
            merged = self._merge()
            if merged.schema.field("value").type != self.values.type:
                raise TypeError(f"categorical column {self.column!r} holds {merged.schema.field('value').type} "
                                f"values in the new train split but its vocabulary holds {self.values.type}")
            position = pc.index_in(merged["value"], value_set=self.values)
            known = position.is_valid()
            known_np = known.to_numpy(zero_copy_only=False)
            np.add.at(counts, position.to_numpy(zero_copy_only=False)[known_np].astype(np.int64),
                      merged["count"].to_numpy()[known_np])
            new = merged.filter(pc.and_(pc.invert(known), pc.greater_equal(merged["count"], self.min_freq)))
            new = new.sort_by([("count", "descending"), ("value", "ascending")])
        else:
            new = pa.table({"value": pa.array([], self.values.type), "count": pa.array([], pa.int64())})
        self._counts = []
        new_values = new["value"].combine_chunks() if new.num_rows else pa.array([], self.values.type)
        new_counts = new["count"].to_numpy().astype(np.int64) if new.num_rows else np.zeros(0, np.int64)
        if self.max_size is None or old + len(new_values) <= self.max_size:
            ids = np.arange(old + len(new_values))  # position in old values + new values
        else:  # rank every value, existing first on ties, then by id / by the newcomers' order
            pool_counts = np.concatenate([counts, new_counts])
            newcomer = np.concatenate([np.zeros(old, np.int64), np.ones(len(new_values), np.int64)])
            position = np.arange(old + len(new_values))
            kept = np.sort(np.lexsort((position, newcomer, -pool_counts))[: self.max_size])
            stay = kept[kept < old]
            admitted = kept[kept >= old]  # in the newcomers' order (count desc, value asc)
            free = np.setdiff1d(np.arange(old), stay)  # evicted ids, ascending
            slots = np.concatenate([free, np.arange(old, old + max(len(admitted) - len(free), 0))])
            ids = np.arange(max(old, len(stay) + len(admitted)))
            ids[slots[: len(admitted)]] = admitted
        pool = pa.concat_arrays([self.values, new_values]) if len(new_values) else self.values
        self.values = pool.take(pa.array(ids, pa.int64())) if len(ids) else pa.array([], self.values.type)
        self.counts = np.concatenate([counts, new_counts])[ids]
        return np.concatenate([[0], np.where(ids < old, ids + 1, -1)]).astype(np.int64)

    def transform(self, values: pa.Array | pa.ChunkedArray, where: str, column: str | None = None) -> np.ndarray:
        if self.values is None:
            raise ValueError(f"the vocabulary of column {self.column!r} is not fitted yet")
        column = column or self.column
        values = _plain_array(values, column, where)
        if values.type != self.values.type:
            shared = f" (it shares the vocabulary of {self.column!r})" if column != self.column else ""
            raise TypeError(
                f"{where}: categorical column {column!r}{shared} holds {values.type} but its vocabulary was fitted "
                f"on {self.values.type} values"
            )
        position = pc.index_in(values, value_set=self.values)
        return pc.fill_null(pc.add(position.cast(pa.int64()), 1), 0).to_numpy()

    def state_dict(self) -> dict[str, Any]:
        if self.values is None:
            raise ValueError(f"the vocabulary of column {self.column!r} is not fitted yet")
        counts = self.counts if self.counts is not None else np.zeros(len(self.values), np.int64)
        return {
            "kind": self.kind, "min_freq": self.min_freq, "max_size": self.max_size,
            "value_type": str(self.values.type), "values": self.values.to_pylist(), "counts": counts.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        value_type = {"string": pa.string(), "int64": pa.int64()}[state["value_type"]]
        self.min_freq, self.max_size = int(state["min_freq"]), state["max_size"]
        self.values = pa.array(state["values"], value_type)
        # a state written before counts were kept: every count 0 (ranked by id when a cap evicts)
        self.counts = np.asarray(state.get("counts") or [0] * len(self.values), dtype=np.int64)


class HashingEncoder(CategoricalEncoder):
    """``1 + hash(value) mod (num_buckets - 1)``; nulls get ``0``. Needs no fitting."""

    kind = "hashing"

    def __init__(self, column: str, num_buckets: int) -> None:
        super().__init__(column)
        if int(num_buckets) < 2:
            raise ValueError(f"categorical column {column!r}: num_buckets must be >= 2 (id 0 is null), got {num_buckets}")
        self.num_buckets = int(num_buckets)

    @property
    def num_ids(self) -> int:
        return self.num_buckets

    def transform(self, values: pa.Array | pa.ChunkedArray, where: str, column: str | None = None) -> np.ndarray:
        values = _plain_array(values, column or self.column, where)
        valid = values.is_valid().to_numpy(zero_copy_only=False)
        if pa.types.is_integer(values.type):
            raw = values.fill_null(0).to_numpy()
        else:
            raw = values.fill_null("").to_numpy(zero_copy_only=False)
        hashed = pd.util.hash_array(raw, categorize=False)
        ids = (1 + hashed % np.uint64(self.num_buckets - 1)).astype(np.int64)
        return np.where(valid, ids, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_buckets": self.num_buckets}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_buckets = int(state["num_buckets"])


class SharedVocabulary(CategoricalEncoder):
    """A column encoded with another categorical column's encoder (``{"vocabulary_of": owner}``); see the module
    docstring. Fitting forwards this column's values to the owner (the vocabulary of the union), so both columns
    always map a value to the same id. Bound to the owner's encoder by :func:`link_shared_vocabularies`."""

    kind = "shared"

    def __init__(self, column: str, vocabulary_of: str) -> None:
        super().__init__(column)
        if not isinstance(vocabulary_of, str) or not vocabulary_of:
            raise ValueError(f"categorical column {column!r}: vocabulary_of must name another categorical column, "
                             f"got {vocabulary_of!r}")
        if vocabulary_of == column:
            raise ValueError(f"categorical column {column!r}: vocabulary_of names the column itself; name the "
                             "categorical column whose vocabulary it shares")
        self.vocabulary_of = vocabulary_of
        self.owner: CategoricalEncoder | None = None

    def _owner(self) -> CategoricalEncoder:
        if self.owner is None:
            raise ValueError(f"categorical column {self.column!r}: its vocabulary ({self.vocabulary_of!r}) is not "
                             "linked (link_shared_vocabularies)")
        return self.owner

    @property
    def learns(self) -> bool:  # type: ignore[override]
        return self._owner().learns

    @property
    def fitted(self) -> bool:
        return self._owner().fitted

    @property
    def num_ids(self) -> int:
        return self._owner().num_ids

    def partial_fit(self, values: pa.Array, where: str, column: str | None = None) -> None:
        self._owner().partial_fit(values, where, column or self.column)

    def transform(self, values: pa.Array | pa.ChunkedArray, where: str, column: str | None = None) -> np.ndarray:
        return self._owner().transform(values, where, column or self.column)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocabulary_of": self.vocabulary_of}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.vocabulary_of = str(state["vocabulary_of"])
        self.owner = None


def link_shared_vocabularies(encoders: Mapping[str, CategoricalEncoder]) -> dict[str, CategoricalEncoder]:
    """Bind every ``SharedVocabulary`` of ``encoders`` to its owner's encoder (checked); returns ``encoders``.

    The owner must be another encoder of ``encoders`` that does not itself share one.
    """
    encoders = dict(encoders)
    for name, encoder in encoders.items():
        if not isinstance(encoder, SharedVocabulary):
            continue
        owner = encoders.get(encoder.vocabulary_of)
        if owner is None:
            raise ValueError(f"categorical column {name!r}: vocabulary_of={encoder.vocabulary_of!r} is not a "
                             f"categorical column; the categorical columns are {sorted(encoders)}")
        if isinstance(owner, SharedVocabulary):
            raise ValueError(f"categorical column {name!r}: vocabulary_of={encoder.vocabulary_of!r}, which itself "
                             f"shares the vocabulary of {owner.vocabulary_of!r}; name {owner.vocabulary_of!r} instead")
        encoder.owner = owner
    return encoders


def make_encoder(column: str, spec: Mapping[str, Any] | None) -> CategoricalEncoder:
    """An encoder from a user spec: ``{"num_buckets": n}`` hashes, ``{"vocabulary_of": column}`` shares another
    column's encoder, otherwise ``{"min_freq", "max_size"}`` builds a vocabulary.

    ``embedding_dim`` may appear in the spec too (it is read by the data module).
    """
    spec = dict(spec or {})
    spec.pop("embedding_dim", None)
    if "vocabulary_of" in spec:
        extra = set(spec) - {"vocabulary_of"}
        if extra:
            raise ValueError(f"categorical column {column!r}: vocabulary_of={spec['vocabulary_of']!r} shares that "
                             f"column's encoder, whose spec holds the options; got also {sorted(extra)}")
        return SharedVocabulary(column, spec["vocabulary_of"])
    if "num_buckets" in spec:
        extra = set(spec) - {"num_buckets"}
        if extra:
            raise ValueError(f"categorical column {column!r}: hashing takes only num_buckets, got also {sorted(extra)}")
        return HashingEncoder(column, spec["num_buckets"])
    extra = set(spec) - {"min_freq", "max_size"}
    if extra:
        raise ValueError(
            f"categorical column {column!r}: unknown options {sorted(extra)}; use min_freq/max_size (vocabulary), "
            "num_buckets (hashing) or vocabulary_of (another column's encoder), and embedding_dim"
        )
    return VocabularyEncoder(column, **spec)


def encoder_from_state(column: str, state: Mapping[str, Any]) -> CategoricalEncoder:
    """An encoder from its ``state_dict()``; a ``SharedVocabulary`` still to be linked (:func:`encoders_from_state`)."""
    if state["kind"] == "shared":
        return SharedVocabulary(column, state["vocabulary_of"])
    encoder = HashingEncoder(column, state["num_buckets"]) if state["kind"] == "hashing" else VocabularyEncoder(column)
    encoder.load_state_dict(state)
    return encoder


def encoders_from_state(states: Mapping[str, Mapping[str, Any]]) -> dict[str, CategoricalEncoder]:
    """``{column: encoder}`` from ``{column: state_dict()}``, shared vocabularies linked to their owners."""
    return link_shared_vocabularies({name: encoder_from_state(name, state) for name, state in states.items()})


def encode_table(table: pa.Table, encoders: Mapping[str, CategoricalEncoder], where: Any) -> pa.Table:
    """``table`` with every encoded column replaced by its int64 ids (a list column by ``list<int64>``; columns
    absent from ``table`` are skipped)."""
    for name, encoder in encoders.items():
        if name in table.column_names:
            ids = encoder.encode(table.column(name), str(where), name)
            table = table.set_column(table.column_names.index(name), name, ids)
    return table
