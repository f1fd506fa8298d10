"""Raw columns -> a model's inputs as a TorchScript module: :class:`ScriptedPreprocessing`, the transform
``export_torchscript`` writes as ``model.preprocessing.pt`` (see ``mtl_lightning.export``), and the bit-exact
integer hashing it shares with pandas. Importable from ``mtl_lightning.export`` as before.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

from .features import DenseFeature, SequenceFeature, SparseFeature, feature_from_config


def _logical_shift(x: Tensor, bits: int) -> Tensor:
    """``x >> bits`` of the 64 bits of ``x`` as an unsigned integer (torch shifts int64 arithmetically)."""
    return (x >> bits) & (9223372036854775807 >> (bits - 1))  # the low 64 - bits bits


def _pandas_int_hash(x: Tensor) -> Tensor:
    """``pandas.util.hash_array`` of int64 values (``categorize=False``), as the int64 with the same 64 bits."""
    x = x ^ _logical_shift(x, 30)
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64; int64 products wrap like uint64 ones
    x = x ^ _logical_shift(x, 27)
    x = x * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ _logical_shift(x, 31)


def _unsigned_mod(x: Tensor, m: int) -> Tensor:
    """The 64 bits of ``x`` read as an unsigned integer, modulo ``m`` (u = 2 * (u >> 1) + (u & 1))."""
    return (_logical_shift(x, 1) % m * 2 + (x & 1)) % m


def _pad_rows(rows: List[List[int]], max_len: int) -> Tensor:
    """Ragged integer lists -> ``(B, max_len)`` int64: each list's first ``max_len`` values, right-padded with 0."""
    flat = torch.jit.annotate(List[int], [])
    for row in rows:
        kept = row[:max_len]
        flat.extend(kept)
        flat.extend([0] * (max_len - len(kept)))
    return torch.tensor(flat, dtype=torch.long).view(len(rows), max_len)


def _fit_length(ids: Tensor, max_len: int) -> Tensor:
    """A padded ``(B, L)`` id tensor as ``(B, max_len)``: its first ``max_len`` columns, right-padded with 0."""
    ids = ids.long()[:, :max_len]
    if ids.shape[1] < max_len:
        ids = torch.cat([ids, torch.zeros(ids.shape[0], max_len - ids.shape[1], dtype=torch.long)], dim=1)
    return ids


class ScriptedPreprocessing(nn.Module):
    """Raw columns -> the model's inputs, as a TorchScript module (what ``datamodules.serving.Preprocessor`` does).

    ``forward(strings, numbers, int_lists=None, string_lists=None) -> Dict[str, Tensor]``:

    * ``strings: Dict[str, List[Optional[str]]]``: the raw string columns of
      the vocabulary-encoded sparse features (``None`` = null);
    * ``numbers: Dict[str, Tensor]``: integer categorical columns (``(B,)``
      int64, encoded by their vocabulary), integer ids given as they are
      (``(B,)``), dense columns (``(B,)`` or ``(B, dim)``, NaN = missing where
      ``fill_missing`` filled it in training) and sequences of ids given as a
      padded ``(B, L)`` int64 tensor (0 = padding, any ``L``);
    * ``int_lists: Dict[str, List[List[int]]]``: sequences as ragged lists,
      either of ids (any sequence) or of raw integer values (a list column
      encoded by a vocabulary or hashing, its own or, with ``vocabulary_of``,
      another column's);
    * ``string_lists: Dict[str, List[List[Optional[str]]]]``: raw string
      lists of the vocabulary-encoded sequence features.

    Every sequence comes out ``(B, max_len)`` as in training: its first
    ``max_len`` values, right-padded with 0. Vocabularies (shared ones
    included), hashing of integer columns (pandas' ``hash_array`` mixing, bit
    for bit), fills, indicators and normalisation are applied as in training;
    unknown values and ids get id 0 (inside a sequence: padding). A hashed
    column given as strings raises: string hashing is SipHash, which
    TorchScript does not have (use ``datamodules.serving.Preprocessor``).
    """

    def __init__(self, preprocessing: Mapping[str, Any]) -> None:
        super().__init__()
        features = [feature_from_config(dict(f)) for f in preprocessing["features"]]
        encoders = dict(preprocessing.get("encoders", {}))
        # a column sharing another column's vocabulary ("shared") is encoded with that column's state
        vocabulary_of = {n: str(e["vocabulary_of"]) if e["kind"] == "shared" else n for n, e in encoders.items()}
        resolved = {n: encoders[vocabulary_of[n]] for n in encoders}
        fills = dict(preprocessing.get("fill_missing", {}))
        indicator_of = {n + "_missing": n for n, f in fills.items() if f["indicator"]}
        normalization = dict(preprocessing.get("normalization", {}))
        sequences = {f.name: int(f.max_len) for f in features if isinstance(f, SequenceFeature)}
        attribute = torch.jit.Attribute  # typed attributes: TorchScript cannot infer the type of an empty dict
        hashed = {n: int(e["num_buckets"]) for n, e in resolved.items() if e["kind"] == "hashing"}
        self.buckets = attribute({n: b for n, b in hashed.items() if n not in sequences}, Dict[str, int])
        self.list_buckets = attribute({n: b for n, b in hashed.items() if n in sequences}, Dict[str, int])
        vocabularies = {n: e for n, e in resolved.items() if e["kind"] == "vocabulary"}
        owners = {vocabulary_of[n] for n in vocabularies}
        self.string_vocab = attribute({o: {v: i + 1 for i, v in enumerate(encoders[o]["values"])} for o in owners
                                       if encoders[o]["value_type"] == "string"}, Dict[str, Dict[str, int]])
        self.int_vocab = attribute({o: {int(v): i + 1 for i, v in enumerate(encoders[o]["values"])} for o in owners
                                    if encoders[o]["value_type"] != "string"}, Dict[str, Dict[int, int]])

        def columns(string: bool, lists: bool) -> Dict[str, str]:  # encoded column -> its vocabulary's key
            return {n: vocabulary_of[n] for n, e in vocabularies.items()
                    if (e["value_type"] == "string") == string and (n in sequences) == lists}

        self.string_columns = attribute(columns(True, False), Dict[str, str])
        self.int_columns = attribute(columns(False, False), Dict[str, str])
        self.string_list_columns = attribute(columns(True, True), Dict[str, str])
        self.int_list_columns = attribute(columns(False, True), Dict[str, str])
        self.max_len = attribute(sequences, Dict[str, int])
        self.fill_value = attribute({n: float(f["value"]) for n, f in fills.items()}, Dict[str, float])
        self.indicator_of = attribute(indicator_of, Dict[str, str])
        self.mean = attribute({n: torch.tensor(z["mean"], dtype=torch.float32) for n, z in normalization.items()},
                              Dict[str, Tensor])
        self.std = attribute({n: torch.tensor(z["std"], dtype=torch.float32) for n, z in normalization.items()},
                             Dict[str, Tensor])
        self.dense = attribute([f.name for f in features if isinstance(f, DenseFeature) and f.name not in indicator_of],
                               List[str])
        self.id_limit = attribute({f.name: int(f.vocab_size) for f in features
                                   if isinstance(f, SparseFeature) and f.name not in encoders}, Dict[str, int])
        self.passed = attribute([n for n in sequences if n not in encoders], List[str])

    def forward(self, strings: Dict[str, List[Optional[str]]], numbers: Dict[str, Tensor],
                int_lists: Optional[Dict[str, List[List[int]]]] = None,
                string_lists: Optional[Dict[str, List[List[Optional[str]]]]] = None) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for name, key in self.string_columns.items():
            vocab = self.string_vocab[key]
            ids: List[int] = []
            for value in strings[name]:
                if value is None:
                    ids.append(0)
                else:
                    ids.append(vocab.get(value, 0))
            out[name] = torch.tensor(ids, dtype=torch.long)
        for name, key in self.int_columns.items():
            ivocab = self.int_vocab[key]
            raw: List[int] = numbers[name].tolist()
            ids = torch.jit.annotate(List[int], [])
            for value in raw:
                ids.append(ivocab.get(value, 0))
            out[name] = torch.tensor(ids, dtype=torch.long)
        for name, key in self.string_list_columns.items():
            if string_lists is None or name not in string_lists:
                raise ValueError("sequence " + name + " holds raw strings: give it in string_lists")
            vocab = self.string_vocab[key]
            rows = string_lists[name]
            length = self.max_len[name]
            ids = torch.jit.annotate(List[int], [])
            for row in rows:
                for value in row[:length]:
                    if value is None:
                        ids.append(0)
                    else:
                        ids.append(vocab.get(value, 0))
                ids.extend([0] * (length - len(row[:length])))
            out[name] = torch.tensor(ids, dtype=torch.long).view(len(rows), length)
        for name, key in self.int_list_columns.items():
            if int_lists is None or name not in int_lists:
                raise ValueError("sequence " + name + " holds raw integer values: give it in int_lists")
            ivocab = self.int_vocab[key]
            rows = int_lists[name]
            length = self.max_len[name]
            ids = torch.jit.annotate(List[int], [])
            for row in rows:
                for value in row[:length]:
                    ids.append(ivocab.get(value, 0))
                ids.extend([0] * (length - len(row[:length])))
            out[name] = torch.tensor(ids, dtype=torch.long).view(len(rows), length)
        for name, buckets in self.buckets.items():
            if name in strings:
                raise ValueError("column " + name + " is hashed from strings (SipHash), which TorchScript cannot do; "
                                 "use datamodules.serving.Preprocessor")
            out[name] = 1 + _unsigned_mod(_pandas_int_hash(numbers[name].long()), buckets - 1)
        for name, buckets in self.list_buckets.items():
            if int_lists is None or name not in int_lists:
                raise ValueError("sequence " + name + " is hashed from integers: give it in int_lists (a sequence "
                                 "hashed from strings needs datamodules.serving.Preprocessor: SipHash)")
            rows = int_lists[name]
            length = self.max_len[name]
            values = _pad_rows(rows, length)
            lengths = torch.tensor([len(row) for row in rows], dtype=torch.long).view(-1, 1)
            hashed = 1 + _unsigned_mod(_pandas_int_hash(values), buckets - 1)
            out[name] = torch.where(torch.arange(length).view(1, -1) < lengths, hashed, torch.zeros_like(hashed))
        for name, limit in self.id_limit.items():
            given = numbers[name].long()
            out[name] = torch.where((given >= 0) & (given < limit), given, torch.zeros_like(given))
        for name in self.dense:
            values = numbers[name].to(torch.float32)
            if name in self.fill_value:
                missing = torch.isnan(values)
                values = torch.where(missing, torch.full_like(values, self.fill_value[name]), values)
                if name + "_missing" in self.indicator_of:
                    out[name + "_missing"] = missing.to(torch.float32)
            if bool(torch.isnan(values).any()):
                raise ValueError("column " + name + " has missing values and no fill_missing in training")
            if name in self.mean:
                values = (values - self.mean[name]) / self.std[name]
            out[name] = values
        for name in self.passed:
            if name in numbers:
                out[name] = _fit_length(numbers[name], self.max_len[name])
            elif int_lists is not None and name in int_lists:
                out[name] = _pad_rows(int_lists[name], self.max_len[name])
            else:
                raise ValueError("sequence " + name + " is missing: give it padded in numbers or ragged in int_lists")
        return out


__all__ = ["ScriptedPreprocessing"]
