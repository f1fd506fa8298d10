"""The preprocessing of a data module: what it fits on the train split, holds, saves and restores.

``Preprocessing`` owns the raw categorical encoders (``categorical=``,
``datamodules.encoders``), the dense normalisers (``normalize=``) and the
missing-value fillers (``fill_missing=``, ``missing_indicator=``,
``datamodules.dense``). It does not read files: the data module hands it the
train split as Arrow chunks (``datamodules.fitting``), so any file format the
data module reads can be preprocessed the same way.

Its part of the data module's ``state_dict`` is plain data::

    {"features": [...], "encoders": {...}, "normalization": {...}, "fill_missing": {...}}

(``fill_missing`` only when there are fillers), present once everything is
fitted; ``load_state_dict`` adopts such a state (a checkpoint's), and with
``grow_vocabulary`` the restored vocabularies grow on the next train split
(``grow``), recording how each id moved (``embedding_row_sources``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
from lightning.pytorch.utilities import rank_zero_info

from mtl_lightning.features import (DenseFeature, Feature, SequenceFeature, SparseFeature, feature_from_config,
                                   feature_to_config)

from .columns import _dense_array
from .dense import DenseNormalizer, MissingFiller, filler_from_state, make_fillers
from .encoders import (CategoricalEncoder, SharedVocabulary, VocabularyEncoder, encoders_from_state,
                       link_shared_vocabularies, make_encoder)
from .fitting import columns_to_fit, fit_chunks, grow_chunks, vocabulary_columns

Chunks = Iterable[tuple[Any, pa.Table]]
PREPROCESSING_KEYS = ("features", "encoders", "normalization", "fill_missing")


def preprocessing_part(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """The preprocessing entries of a data module state (its partition record and other entries left out)."""
    return {key: value for key, value in (state or {}).items() if key in PREPROCESSING_KEYS}


class Preprocessing:
    """Categorical encoders, dense normalisers and missing-value fillers of one data module (see the module docstring).

    Args: ``categorical``, ``normalize``, ``fill_missing``, ``missing_indicator``
    and ``embedding_dim`` as ``ParquetDataModule`` documents them; ``name``
    prefixes the log lines (the data module's class name).
    """

    def __init__(
        self,
        categorical: Mapping[str, Mapping[str, Any] | None] | Sequence[str] | None = None,
        normalize: bool | Sequence[str] = False,
        fill_missing: Mapping[str, float | str] | None = None,
        missing_indicator: bool | Sequence[str] = False,
        embedding_dim: int = 16,
        name: str = "data module",
    ) -> None:
        if categorical is None:
            categorical = {}
        elif isinstance(categorical, str) or not isinstance(categorical, Mapping):
            categorical = {column: {} for column in ([categorical] if isinstance(categorical, str) else categorical)}
        self.categorical = {column: dict(spec or {}) for column, spec in categorical.items()}
        self.encoders: dict[str, CategoricalEncoder] = link_shared_vocabularies(
            {column: make_encoder(column, spec) for column, spec in self.categorical.items()})
        if not isinstance(normalize, bool) and (isinstance(normalize, str) or not isinstance(normalize, Sequence)):
            raise TypeError(f"normalize must be True/False or a list of dense column names, got {normalize!r}")
        self.normalize = normalize if isinstance(normalize, bool) else list(normalize)
        self.normalizers: dict[str, DenseNormalizer] = {}
        self.fillers: dict[str, MissingFiller] = make_fillers(fill_missing, missing_indicator)
        self.embedding_dim = embedding_dim
        self.name = name
        self.grow_from: dict[str, Any] | None = None  # a restored state whose vocabularies are still to grow
        self.grown_from: dict[str, Any] | None = None  # the restored state the vocabularies grew from
        self.row_sources: dict[str, tuple[int, np.ndarray]] = {}  # column -> (ids before, sources), see grow

    # ------------------------------------------------------------ queries
    @property
    def active(self) -> bool:
        """Whether there is anything to fit or apply."""
        return bool(self.encoders or self.normalize or self.fillers)

    def fitted(self) -> bool:
        """Whether every categorical encoder, dense normaliser and filler has its mapping."""
        return (all(e.fitted for e in self.encoders.values()) and all(n.fitted for n in self.normalizers.values())
                and all(f.fitted for f in self.fillers.values()))

    def unfitted(self) -> list[str]:
        """The columns whose encoder, normaliser or filler is not fitted yet."""
        return ([n for n, e in self.encoders.items() if not e.fitted] + [n for n, z in self.normalizers.items()
                if not z.fitted] + [n for n, f in self.fillers.items() if not f.fitted])

    def indicator_names(self) -> set[str]:
        return {f.indicator_name for f in self.fillers.values() if f.indicator}

    def embedding_row_sources(self) -> dict[str, tuple[int, np.ndarray]]:
        """How the vocabularies grew since the restored state: ``{feature: (ids before, sources)}``.

        ``sources[j]`` is the id the value of new id ``j`` had in the restored
        state, or ``-1`` (a new value: its embedding row starts afresh). Empty
        unless ``grow`` grew something.
        """
        return {name: (before, rows) for name, (before, rows) in self.row_sources.items()
                if len(rows) != before or not np.array_equal(rows, np.arange(before))}

    # ------------------------------------------------------------ fitting
    def _with_fillers(self, features: list[Feature]) -> list[Feature]:
        """Check the filled columns and add their missing-indicator features."""
        dense = {f.name: f for f in features if isinstance(f, DenseFeature)}
        names = {f.name for f in features}
        for name, filler in self.fillers.items():
            if name not in dense or dense[name].dim != 1:
                raise ValueError(
                    f"fill_missing names {name!r}, which is not a dense feature of one value per row (dense: "
                    f"{sorted(n for n, f in dense.items() if f.dim == 1)}); missing categorical values need no "
                    "filling: with categorical=... a null gets the out-of-vocabulary id 0"
                )
            if filler.indicator and filler.indicator_name not in names:
                features = [*features, DenseFeature(filler.indicator_name)]
        return features

    def _make_normalizers(self, features: Sequence[Feature]) -> None:
        dense = {f.name: f for f in features if isinstance(f, DenseFeature)}
        indicators = self.indicator_names()
        wanted = ([n for n in dense if n not in indicators] if self.normalize is True
                  else ([] if self.normalize is False else self.normalize))
        for name in wanted:
            if name not in dense:
                raise ValueError(f"normalize names {name!r}, which is not a dense feature (dense: {sorted(dense)})")
            if name not in self.normalizers:
                self.normalizers[name] = DenseNormalizer(name, dense[name].dim)

    def prepare(
        self,
        features: Sequence[Feature],
        train_chunks: Callable[[list[str]], Chunks] | None,
        progress: Callable[[], Any] | None = None,
        given: frozenset[str] | set[str] = frozenset(),
    ) -> tuple[list[Feature], bool]:
        """Fit what is unfitted and grow restored vocabularies on the train split; ``(features, grew)``.

        ``train_chunks(columns)`` yields the train split's chunks of those
        columns (``None``: no train split, nothing is fitted); ``progress()``
        makes a progress bar with ``update(rows)`` and ``close()`` (or ``None``).
        The features come back with the missing indicators added and every
        encoded column a ``SparseFeature`` (a list column: the
        ``SequenceFeature`` given or inferred for it) whose ``vocab_size`` is
        its encoder's number of ids; a column that shares another's vocabulary
        (``vocabulary_of``) and whose spec was not given (``given``: the names
        of the user's own specs) also reads its table: ``shared_with`` the
        owner, with the owner's ``embedding_dim``. ``grew`` is ``True`` when
        vocabularies grew (splits read before must be read again).
        """
        features = self._with_fillers(list(features))
        self._make_normalizers(features)
        dense = {f.name: f for f in features if isinstance(f, DenseFeature)}
        if not self.fitted() and train_chunks is not None:
            columns = columns_to_fit(self.encoders, self.normalizers, self.fillers)
            if columns:
                bar = progress() if progress is not None else None
                try:
                    fit_chunks(train_chunks(columns), self.encoders, self.normalizers,
                               lambda column, name, where: _dense_array(column, dense[name], where),
                               fillers=self.fillers, progress=bar.update if bar is not None else None)
                finally:
                    if bar is not None:
                        bar.close()
            self.describe()
        grew = False
        if self.grow_from is not None and train_chunks is not None:
            before = {name: e.num_ids for name, e in self.encoders.items() if isinstance(e, VocabularyEncoder)}
            columns = vocabulary_columns(self.encoders)
            sources = grow_chunks(train_chunks(columns), self.encoders) if columns else {}
            self.row_sources = {name: (before[name], rows) for name, rows in sources.items()}
            self.grown_from, self.grow_from = self.grow_from, None
            grew = True
            self.describe_growth()
        if all(e.fitted for e in self.encoders.values()):
            features = self._resolve_categorical(features, given)
        return features, grew

    def _resolve_categorical(self, features: Sequence[Feature], given: frozenset[str] | set[str] = frozenset()
                             ) -> list[Feature]:
        by_name = {f.name: f for f in features}
        # the owners of shared vocabularies first: a column sharing one takes its owner's embedding_dim
        order = sorted(self.encoders, key=lambda name: isinstance(self.encoders[name], SharedVocabulary))
        for name in order:
            encoder = self.encoders[name]
            spec = self.categorical.get(name, {})
            current = by_name.get(name)
            if current is not None and not isinstance(current, (SparseFeature, SequenceFeature)):
                raise ValueError(
                    f"categorical column {name!r} is given as a {type(current).__name__}; it must be a SparseFeature "
                    "(a SequenceFeature for a list column)"
                )
            if current is None:
                current = SparseFeature(name, encoder.num_ids, int(spec.get("embedding_dim", self.embedding_dim)))
            elif current.vocab_size != encoder.num_ids:
                current = dataclasses.replace(current, vocab_size=encoder.num_ids)
            if isinstance(encoder, SharedVocabulary) and name not in given:
                owner = by_name.get(encoder.vocabulary_of)
                if isinstance(owner, (SparseFeature, SequenceFeature)) and not owner.shared_with:
                    dim = int(spec.get("embedding_dim", owner.embedding_dim))
                    if dim != owner.embedding_dim:
                        raise ValueError(
                            f"categorical column {name!r}: embedding_dim {dim} differs from that of "
                            f"{encoder.vocabulary_of!r} ({owner.embedding_dim}), whose vocabulary and table it shares; "
                            "leave it out, or give the column's own spec in features= to keep a table of its own")
                    current = dataclasses.replace(current, shared_with=owner.name, embedding_dim=dim)
            by_name[name] = current
        return list(by_name.values())

    def describe(self) -> None:
        """Log the fitted vocabularies (sizes), normalisation statistics and fill values at INFO on rank 0."""
        parts = []
        for name, encoder in self.encoders.items():
            if isinstance(encoder, SharedVocabulary):
                parts.append(f"{name} (the vocabulary of {encoder.vocabulary_of})")
            elif isinstance(encoder, VocabularyEncoder):
                parts.append(f"{name} (vocabulary of {encoder.num_ids - 1:,} values + id 0 for unseen/null)")
            else:
                parts.append(f"{name} (hashing into {encoder.num_ids:,} ids)")
        if parts:
            rank_zero_info(f"{self.name} categorical encoders: " + ", ".join(parts))
        if self.normalizers:
            rank_zero_info(f"{self.name} normalisation (mean, std): " + ", ".join(
                f"{name} ({', '.join(f'{m:.4g}' for m in z.mean)}; {', '.join(f'{v:.4g}' for v in z.std)})"
                for name, z in self.normalizers.items()))
        if self.fillers:
            rank_zero_info(f"{self.name} missing values filled with: " + ", ".join(
                f"{name} = {f.value:.6g}" + (f" (+ {f.indicator_name})" if f.indicator else "")
                for name, f in self.fillers.items()))

    def describe_growth(self) -> None:
        """Log, at INFO on rank 0, how each vocabulary grew on the train split: values before and after, the
        newcomers admitted and the values evicted by a ``max_size`` cap (``row_sources``)."""
        parts = []
        for name, (before, sources) in self.row_sources.items():
            kept = int((sources[1:] >= 1).sum())  # ids whose value the vocabulary had before (id 0 aside)
            new, evicted = int((sources[1:] < 0).sum()), (before - 1) - kept
            cap = getattr(self.encoders[name], "max_size", None)
            parts.append(f"{name} {before - 1:,} -> {len(sources) - 1:,} values (+{new:,} new"
                         + (f", {evicted:,} evicted: max_size {cap:,}" if evicted else "") + ")")
        if parts:
            rank_zero_info(f"{self.name} vocabularies grown on the train split: " + ", ".join(parts))

    # -------------------------------------------------------------- state
    def state_dict(self, features: Sequence[Feature] | None) -> dict[str, Any]:
        """The resolved feature specs and every fitted mapping as plain data (empty when nothing is fitted or used)."""
        if not (self.encoders or self.normalizers or self.fillers) or not self.fitted():
            return {}
        state: dict[str, Any] = {
            "features": [feature_to_config(f) for f in features or []],
            "encoders": {name: e.state_dict() for name, e in self.encoders.items()},
            "normalization": {name: z.state_dict() for name, z in self.normalizers.items()},
        }
        if self.fillers:
            state["fill_missing"] = {name: f.state_dict() for name, f in self.fillers.items()}
        return state

    def is_grown_from(self, state: Mapping[str, Any]) -> bool:
        """Whether ``state`` is the restored state the current vocabularies grew from (they include it)."""
        return self.grown_from is not None and preprocessing_part(state) == preprocessing_part(self.grown_from)

    def load_state_dict(self, state: Mapping[str, Any]) -> list[Feature]:
        """Adopt a state's encoders, statistics and fills; returns its feature specs. Pending growth is dropped."""
        features = [feature_from_config(dict(f)) for f in state["features"]]
        self.encoders = encoders_from_state(state["encoders"])
        self.normalizers = {}
        for name, s in state["normalization"].items():
            self.normalizers[name] = DenseNormalizer(name, int(s["dim"]))
            self.normalizers[name].load_state_dict(s)
        if "fill_missing" in state:  # a state without fills (written before them) keeps this module's own
            self.fillers = {name: filler_from_state(name, s) for name, s in state["fill_missing"].items()}
        self.row_sources, self.grown_from, self.grow_from = {}, None, None
        return features

    def has_vocabularies(self) -> bool:
        return any(isinstance(e, VocabularyEncoder) for e in self.encoders.values())
