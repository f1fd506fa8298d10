"""Sequence encoders: a padded behaviour sequence read with the candidate as the query.

References:

* ``DINAttention``: Zhou et al., "Deep Interest Network for Click-Through Rate
  Prediction", KDD 2018 (the local activation unit, Dice).
* ``TargetAttention``: scaled dot-product attention (Vaswani et al., "Attention
  Is All You Need", NeurIPS 2017) with the candidate as the one query.
* ``BSTEncoder``: Chen et al., "Behavior Sequence Transformer for E-commerce
  Recommendation in Alibaba", DLP-KDD 2019.

Every encoder reads the same three tensors and returns one vector per row::

    keys   (B, L, d)   the embeddings of the sequence's positions; for a group of aligned
                       sequences (hist_item, hist_cat of the same clicks) their per-position
                       embeddings concatenated along the last dim
    mask   (B, L)      bool, True where the position holds an id (id 0 is padding)
    query  (B, dq)     the candidate's embedding(s), concatenated in the same order as the keys
    ->     (B, output_dim)

Padding never receives weight: keys at padded positions are replaced by zeros
before anything reads them and their attention weights are exactly zero, so
changing them changes no output and their gradients are exactly zero. A row
whose positions are all padding encodes to exactly zeros (no NaN from a softmax
over an empty set). All work is batched over rows and positions; the modules
trace with ``torch.jit.trace``, export to ONNX and compile with
``torch.jit.script``.
"""

from __future__ import annotations

import inspect
from abc import ABCMeta, abstractmethod
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mlp import activation_layer

__all__ = [
    "SequenceEncoder", "Dice", "DINAttention", "TargetAttention", "BSTEncoder", "SEQUENCE_ENCODERS",
    "sequence_encoder", "masked_softmax",
]


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax of ``scores`` over the last dim where ``mask`` is True; exactly 0 elsewhere.

    Masked scores are set to ``-inf`` before the softmax, so their weights and
    gradients are exactly zero. A row with no True entry is softmaxed unmasked
    (finite, no NaN) and then zeroed, so it gets all zeros.
    """
    softmaxed = mask | ~mask.any(dim=-1, keepdim=True)  # an empty row keeps its scores: no softmax over nothing
    weights = torch.softmax(scores.masked_fill(~softmaxed, float("-inf")), dim=-1)
    return torch.where(mask, weights, torch.zeros_like(weights))


def _check_inputs(
    name: str, keys: Tensor, mask: Tensor, query: Tensor, key_dim: int, query_dim: int, max_len: int | None = None
) -> None:
    """Shapes checked in eager mode (skipped while tracing: the shapes of a traced call are fixed by its example)."""
    if torch.jit.is_tracing():
        return
    if keys.dim() != 3 or keys.shape[-1] != key_dim:
        raise ValueError(f"{name}: keys must be (B, L, {key_dim}), got {tuple(keys.shape)}")
    if mask.shape != keys.shape[:2]:
        raise ValueError(f"{name}: mask must be (B, L) = {tuple(keys.shape[:2])}, got {tuple(mask.shape)}")
    if query.dim() != 2 or query.shape[-1] != query_dim:
        raise ValueError(f"{name}: query must be (B, {query_dim}), got {tuple(query.shape)}")
    if max_len is not None and keys.shape[1] > max_len:
        raise ValueError(f"{name}: the sequence has {keys.shape[1]} positions, more than max_len={max_len}")


class SequenceEncoder(nn.Module, metaclass=ABCMeta):
    """Base of the sequence encoders: ``forward(keys (B, L, d), mask (B, L), query (B, dq)) -> (B, output_dim)``.

    Subclasses set the attributes ``key_dim``, ``query_dim`` and ``output_dim`` (ints).
    """

    @abstractmethod
    def forward(self, keys: Tensor, mask: Tensor, query: Tensor) -> Tensor:
        """``(B, L, key_dim), (B, L), (B, query_dim) -> (B, output_dim)``; padded positions get no weight."""


class Dice(nn.Module):
    """Dice activation of DIN (Zhou et al. 2018, eq. 8), with statistics over the valid positions only.

    ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))``, ``f(s) = p(s) * s + (1 - p(s)) * alpha * s``,
    per hidden unit, ``alpha`` learned (initialised at 0). In training ``E[s]``
    and ``Var[s]`` are the mean and (biased) variance of the batch over the
    positions where ``mask`` is True, so padding does not move them, and the
    running averages (``momentum``) used in evaluation are updated as
    ``BatchNorm`` does (unbiased variance); a batch without any valid position
    leaves them unchanged. Input ``(B, L, H)`` and mask ``(B, L)``.
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.training:
            weight = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
            count = weight.sum()
            mean = (x * weight).sum(dim=(0, 1)) / count.clamp(min=1.0)  # (H,)
            var = ((x - mean) ** 2 * weight).sum(dim=(0, 1)) / count.clamp(min=1.0)  # (H,)
            with torch.no_grad():
                unbiased = var * count / (count - 1.0).clamp(min=1.0)
                seen = count > 0
                self.running_mean.copy_(torch.where(
                    seen, (1 - self.momentum) * self.running_mean + self.momentum * mean, self.running_mean))
                self.running_var.copy_(torch.where(
                    seen, (1 - self.momentum) * self.running_var + self.momentum * unbiased, self.running_var))
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((x - mean) / torch.sqrt(var + self.eps))  # (B, L, H)
        return p * x + (1 - p) * self.alpha * x


class _ActivationUnit(nn.Module):
    """DIN's local activation unit: an MLP over ``[q, k, q - k, q * k]`` per position, one score each.

    ``Linear -> activation`` per size of ``hidden``, then ``Linear(., 1)`` (bias-free
    with ``output_bias=False``).
    ``activation="dice"`` uses :class:`Dice` (statistics over valid positions),
    any other name an activation of :func:`activation_layer`.
    """

    def __init__(self, dim: int, hidden: Sequence[int], activation: str, output_bias: bool = True) -> None:
        super().__init__()
        self.linears = nn.ModuleList()
        self.dices = nn.ModuleList()
        self.activations = nn.ModuleList()
        self.use_dice = activation == "dice"
        width = 4 * dim
        for size in hidden:
            self.linears.append(nn.Linear(width, size))
            if self.use_dice:
                self.dices.append(Dice(size))
            else:
                self.activations.append(activation_layer(activation))
            width = size
        self.output = nn.Linear(width, 1, bias=output_bias)

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        q = query.unsqueeze(1).expand_as(keys)  # (B, L, d)
        h = torch.cat([q, keys, q - keys, q * keys], dim=-1)  # (B, L, 4d)
        if self.use_dice:
            for linear, dice in zip(self.linears, self.dices):
                h = dice(linear(h), mask)  # (B, L, H)
        else:
            for linear, activation in zip(self.linears, self.activations):
                h = activation(linear(h))  # (B, L, H)
        return self.output(h).squeeze(-1)  # (B, L)


class DINAttention(SequenceEncoder):
    """DIN (Zhou et al., KDD 2018): ``sum_j w_j k_j`` with ``w_j = a(q, k_j)`` from the local activation unit.

    ``a`` is an MLP over ``[q, k_j, q - k_j, q * k_j]`` (hidden sizes
    ``attention_hidden``, then one linear output), evaluated at every position
    in one batched call. Choices, all documented in docs/inputs.md:

    * Normalisation. ``normalization="none"`` (default) keeps the raw scores as
      the paper does (the weights need not sum to 1, "normalization with
      softmax on the output of a(.) is abandoned", eq. 3): the output's norm
      then grows with the number of relevant behaviours, which is the
      intensity of interest the paper wants to keep. ``"softmax"`` normalises over the valid positions, as the
      authors' released code and TorchEasyRec do (the score layer is then
      bias-free: a softmax ignores a shared shift). Either way padded positions
      get weight exactly 0 and an all-padding row encodes to zeros.
    * Activation. ``"sigmoid"`` (default), as in the authors' released code and
      DeepCTR's ``LocalActivationUnit``; ``"dice"`` is the paper's data-adaptive
      activation (:class:`Dice`, statistics over valid positions only);
      ``"prelu"`` the paper's other choice; any name of
      :func:`~mtl_lightning.layers.mlp.activation_layer` works.
    * Query width. When ``query_dim != key_dim`` the query is first mapped to
      ``key_dim`` by a learned bias-free linear layer (``query_projection``),
      so that ``q - k`` and ``q * k`` are defined; with equal widths it is used
      as it is.

    Shapes: keys ``(B, L, key_dim)``, mask ``(B, L)``, query ``(B, query_dim)``
    -> ``(B, key_dim)``.
    """

    def __init__(
        self,
        key_dim: int,
        query_dim: int,
        attention_hidden: Sequence[int] = (80, 40),
        activation: str = "sigmoid",
        normalization: str = "none",
    ) -> None:
        super().__init__()
        if normalization not in ("none", "softmax"):
            raise ValueError(f"DINAttention: normalization must be 'none' or 'softmax', got {normalization!r}")
        if activation != "dice":
            activation_layer(activation)  # unknown names fail here with the list of choices
        self.key_dim = key_dim
        self.query_dim = query_dim
        self.output_dim = key_dim
        self.normalization = normalization
        self.query_projection: nn.Module = (
            nn.Identity() if query_dim == key_dim else nn.Linear(query_dim, key_dim, bias=False)
        )
        # a softmax is shift-invariant: the score's bias would get no gradient, so it has none
        self.activation_unit = _ActivationUnit(key_dim, list(attention_hidden), activation,
                                               output_bias=normalization == "none")

    def attention_weights(self, keys: Tensor, mask: Tensor, query: Tensor) -> Tensor:
        """The weight of every position ``(B, L)``: the activation unit's score (softmaxed if asked), 0 at padding."""
        if not torch.jit.is_scripting():
            _check_inputs("DINAttention", keys, mask, query, self.key_dim, self.query_dim)
        mask = mask.to(torch.bool)
        keys = torch.where(mask.unsqueeze(-1), keys, torch.zeros_like(keys))  # (B, L, d), padding -> 0
        scores = self.activation_unit(self.query_projection(query), keys, mask)  # (B, L)
        if self.normalization == "softmax":
            return masked_softmax(scores, mask)
        return torch.where(mask, scores, torch.zeros_like(scores))

    def forward(self, keys: Tensor, mask: Tensor, query: Tensor) -> Tensor:
        weights = self.attention_weights(keys, mask, query)  # (B, L)
        keys = torch.where(mask.to(torch.bool).unsqueeze(-1), keys, torch.zeros_like(keys))  # (B, L, d)
        return torch.einsum("bl,bld->bd", weights, keys)  # (B, d)


class TargetAttention(SequenceEncoder):
    """Scaled dot-product attention with the candidate as the one query, values = the sequence embeddings.

    ``w = softmax_valid((W_q q) . (W_k k_j) / sqrt(attention_dim))``,
    ``output = sum_j w_j k_j``. ``W_q`` (``query_dim -> attention_dim``) and
    ``W_k`` (``key_dim -> attention_dim``) are learned bias-free projections,
    so the query and the keys may have different widths; the values are the
    keys themselves, so the output lives in the embedding space, as a mean
    pooling's does (``output_dim = key_dim``). The softmax runs over the valid
    positions only; an all-padding row encodes to zeros.

    Shapes: keys ``(B, L, key_dim)``, mask ``(B, L)``, query ``(B, query_dim)``
    -> ``(B, key_dim)``.
    """

    def __init__(self, key_dim: int, query_dim: int, attention_dim: int | None = None) -> None:
        super().__init__()
        attention_dim = key_dim if attention_dim is None else attention_dim
        if attention_dim < 1:
            raise ValueError(f"TargetAttention: attention_dim must be >= 1, got {attention_dim}")
        self.key_dim = key_dim
        self.query_dim = query_dim
        self.attention_dim = attention_dim
        self.output_dim = key_dim
        self.query_projection = nn.Linear(query_dim, attention_dim, bias=False)
        self.key_projection = nn.Linear(key_dim, attention_dim, bias=False)

    def attention_weights(self, keys: Tensor, mask: Tensor, query: Tensor) -> Tensor:
        """Softmax weights ``(B, L)`` over the valid positions; exactly 0 at padding and on all-padding rows."""
        if not torch.jit.is_scripting():
            _check_inputs("TargetAttention", keys, mask, query, self.key_dim, self.query_dim)
        mask = mask.to(torch.bool)
        keys = torch.where(mask.unsqueeze(-1), keys, torch.zeros_like(keys))  # (B, L, d)
        q = self.query_projection(query)  # (B, A)
        k = self.key_projection(keys)  # (B, L, A)
        scores = torch.einsum("ba,bla->bl", q, k) / math.sqrt(self.attention_dim)  # (B, L)
        return masked_softmax(scores, mask)

    def forward(self, keys: Tensor, mask: Tensor, query: Tensor) -> Tensor:
        weights = self.attention_weights(keys, mask, query)  # (B, L)
        keys = torch.where(mask.to(torch.bool).unsqueeze(-1), keys, torch.zeros_like(keys))  # (B, L, d)
        return torch.einsum("bl,bld->bd", weights, keys)  # (B, d)


class _TransformerLayer(nn.Module):
    """One post-norm transformer encoder layer with a key-padding mask (BST section 2.2).

    ``x = LayerNorm(x + Dropout(MultiHead(x)))``, then
    ``x = LayerNorm(x + Dropout(W2 LeakyReLU(W1 x)))``. The same computation as
    ``nn.TransformerEncoderLayer(norm_first=False, activation=leaky_relu)``,
    written out so that an all-padding row, tracing and ONNX export behave
    the same in training and evaluation (no fused fast path).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.in_projection = nn.Linear(dim, 3 * dim)  # q, k, v stacked (nn.MultiheadAttention's in_proj layout)
        self.out_projection = nn.Linear(dim, dim)
        self.attention_dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_activation = nn.LeakyReLU()
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        batch, length, dim = x.shape
        qkv = self.in_projection(x).reshape(batch, length, 3, self.num_heads, self.head_dim)  # (B, T, 3, h, e)
        q, k, v = qkv.unbind(dim=2)  # (B, T, h, e) each
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(self.head_dim)  # (B, h, T, T)
        weights = masked_softmax(scores, valid[:, None, None, :].expand_as(scores))  # (B, h, T, T)
        attended = torch.einsum("bhqk,bkhe->bqhe", self.attention_dropout(weights), v)  # (B, T, h, e)
        x = self.norm1(x + self.dropout1(self.out_projection(attended.reshape(batch, length, dim))))  # (B, T, d)
        ffn = self.ffn_out(self.ffn_activation(self.ffn_in(x)))  # (B, T, d)
        return self.norm2(x + self.dropout2(ffn))


class BSTEncoder(SequenceEncoder):
    """Behavior Sequence Transformer (Chen et al., DLP-KDD 2019) over the sequence plus the candidate.

    The candidate (projected to ``key_dim`` by a bias-free linear layer when
    ``query_dim != key_dim``) is appended as position ``L``; a learned position
    embedding (``max_len + 1`` rows) is added to every position; ``num_layers``
    post-norm transformer layers (``num_heads`` heads, feed-forward width
    ``ffn_dim``, LeakyReLU as in the paper, ``dropout``) run with a key-padding
    mask, so padded positions are never attended to (the candidate always is,
    so no attention row is empty).

    Output (``output=``):

    * ``"candidate"`` (default): the transformer's output at the candidate's
      position, ``(B, key_dim)``. It is the candidate attending over the
      history (and itself) through every layer: the target attention the
      architecture needs, at a width that does not grow with ``max_len``.
    * ``"mean"``: the mean of the outputs over the valid positions and the
      candidate, ``(B, key_dim)``.
    * ``"flatten"``: every position's output, padded positions zeroed,
      concatenated, ``(B, (max_len + 1) * key_dim)``: the paper's choice (it
      feeds all of them to the MLP).

    A row without any valid history position encodes to exactly zeros in
    every mode, as the other encoders and mean pooling do, so an empty history
    contributes nothing (the candidate's own embedding reaches the model as
    its own feature). The paper's position feature is the time since each
    click; without timestamps the position index is embedded instead.

    Shapes: keys ``(B, L, key_dim)`` with ``L <= max_len``, mask ``(B, L)``,
    query ``(B, query_dim)`` -> ``(B, output_dim)``.
    """

    def __init__(
        self,
        key_dim: int,
        query_dim: int,
        max_len: int,
        num_layers: int = 1,
        num_heads: int = 1,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        output: str = "candidate",
    ) -> None:
        super().__init__()
        if output not in ("candidate", "mean", "flatten"):
            raise ValueError(f"BSTEncoder: output must be 'candidate', 'mean' or 'flatten', got {output!r}")
        if num_layers < 1:
            raise ValueError(f"BSTEncoder: num_layers must be >= 1, got {num_layers}")
        if num_heads < 1 or key_dim % num_heads:
            raise ValueError(
                f"BSTEncoder: num_heads={num_heads} must divide the sequence embedding width {key_dim} "
                "(for a group: the sum of its features' embedding_dim)"
            )
        if max_len < 1:
            raise ValueError(f"BSTEncoder: max_len must be >= 1, got {max_len}")
        self.key_dim = key_dim
        self.query_dim = query_dim
        self.max_len = max_len
        self.output = output
        self.output_dim = (max_len + 1) * key_dim if output == "flatten" else key_dim
        self.query_projection: nn.Module = (
            nn.Identity() if query_dim == key_dim else nn.Linear(query_dim, key_dim, bias=False)
        )
        self.position = nn.Embedding(max_len + 1, key_dim)
        ffn_dim = 4 * key_dim if ffn_dim is None else ffn_dim
        self.layers = nn.ModuleList(_TransformerLayer(key_dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))

    def forward(self, keys: Tensor, mask: Tensor, query: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            _check_inputs("BSTEncoder", keys, mask, query, self.key_dim, self.query_dim, self.max_len)
        length = keys.shape[1]
        mask = mask.to(torch.bool)
        keys = torch.where(mask.unsqueeze(-1), keys, torch.zeros_like(keys))  # (B, L, d)
        candidate = self.query_projection(query).unsqueeze(1)  # (B, 1, d)
        x = torch.cat([keys, candidate], dim=1) + self.position.weight[: length + 1]  # (B, L+1, d)
        valid = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, L+1)
        for layer in self.layers:
            x = layer(x, valid)  # (B, L+1, d)
        x = torch.where(valid.unsqueeze(-1), x, torch.zeros_like(x))  # padded positions -> 0
        if self.output == "candidate":
            out = x[:, -1]  # (B, d)
        elif self.output == "mean":
            out = x.sum(dim=1) / valid.sum(dim=1, keepdim=True).to(x.dtype)  # (B, d)
        else:
            history = F.pad(x[:, :-1], [0, 0, 0, self.max_len - length])  # (B, max_len, d): a shorter batch padded
            out = torch.cat([history, x[:, -1:]], dim=1).flatten(1)  # (B, (max_len+1) d)
        has_history = mask.any(dim=1, keepdim=True)  # (B, 1)
        return torch.where(has_history, out, torch.zeros_like(out))


SEQUENCE_ENCODERS: dict[str, type[SequenceEncoder]] = {
    "din": DINAttention,
    "attention": TargetAttention,
    "transformer": BSTEncoder,
}


def sequence_encoder(pooling: str, key_dim: int, query_dim: int, max_len: int, **options: Any) -> SequenceEncoder:
    """The encoder named by ``pooling`` (``"din"``, ``"attention"``, ``"transformer"``) built with ``options``.

    Args:
        pooling: ``"din"`` -> :class:`DINAttention`, ``"attention"`` ->
            :class:`TargetAttention`, ``"transformer"`` -> :class:`BSTEncoder`.
        key_dim: width of one position's embedding (a group's: the sum of its features' widths).
        query_dim: width of the concatenated candidate embedding(s).
        max_len: the padded sequence length (used by ``"transformer"``'s position embeddings).
        **options: the encoder's own keyword arguments (``attention_hidden``, ``activation``,
            ``normalization`` / ``attention_dim`` / ``num_layers``, ``num_heads``, ``ffn_dim``,
            ``dropout``, ``output``).

    Raises:
        ValueError: an unknown ``pooling`` name (the message lists the encoders).
        TypeError: an option the encoder does not take (the message lists those it takes).
    """
    if pooling not in SEQUENCE_ENCODERS:
        raise ValueError(f"unknown sequence encoder {pooling!r}; choose from {sorted(SEQUENCE_ENCODERS)}")
    cls = SEQUENCE_ENCODERS[pooling]
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "key_dim", "query_dim")]
    unknown = sorted(set(options) - set(accepted) - {"max_len"})
    if unknown:
        taken = [name for name in accepted if name != "max_len"]
        raise TypeError(f"sequence encoder {pooling!r} ({cls.__name__}) takes no option(s) {unknown}; it takes {taken}")
    if "max_len" in accepted:
        options["max_len"] = max_len
    return cls(key_dim=key_dim, query_dim=query_dim, **options)
