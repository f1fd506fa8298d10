"""Explicit feature-interaction blocks that sit between the input layer and an architecture's bottom.

References:

* ``CrossNetworkV2``: Wang et al., "DCN V2: Improved Deep & Cross Network and
  Practical Lessons for Web-scale Learning to Rank Systems", WWW 2021.
* ``SENet``: Huang et al., "FiBiNET: Combining Feature Importance and Bilinear
  Feature Interaction for Click-Through Rate Prediction", RecSys 2019 (its
  SENET layer, after Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018).
* ``MaskNet`` / ``MaskBlock``: Wang et al., "MaskNet: Introducing Feature-Wise
  Multiplication to CTR Ranking Models by Instance-Guided Mask", DLP-KDD 2021.

``CrossNetworkV2`` and ``MaskNet`` read the flat input ``(B, D)``; ``SENet``
reads one vector per field ``(B, F, d)``. Each module has ``output_dim`` (the
width of a flat output). They are plain modules: batched, traceable, ONNX
exportable.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .mlp import MLP, activation_layer

__all__ = ["CrossNetworkV2", "SENet", "MaskBlock", "MaskNet"]


def _check_shape(name: str, x: Tensor, trailing: list[int], layout: str) -> None:
    """``x`` must be ``(B, *trailing)`` (checked in eager mode; a traced call's shapes are fixed by its example)."""
    if torch.jit.is_tracing():
        return
    if x.dim() != 1 + len(trailing) or list(x.shape[1:]) != trailing:
        expected = ", ".join(["B", *map(str, trailing)])
        raise ValueError(f"{name}: input must be {layout} = ({expected}), got {tuple(x.shape)}")


class CrossNetworkV2(nn.Module):
    """DCN-v2's cross network: ``num_layers`` cross layers ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``.

    ``*`` is the element-wise product, ``x_0`` the input. The cross matrix
    ``W_l`` (``D x D``) takes one of three forms:

    * ``low_rank=None`` (default): full rank, the paper's eq. (1).
    * ``low_rank=r``, ``num_experts=1``: ``W_l = U_l V_l^T`` with ``U_l, V_l``
      of shape ``D x r`` (eq. 3): ``x_{l+1} = x_0 * (U_l (V_l^T x_l) + b_l) + x_l``.
    * ``low_rank=r``, ``num_experts=K > 1``: the mixture of low-rank experts
      (DCN-Mix, eqs. 4-5): ``x_{l+1} = sum_i G_i(x_l) E_i(x_l) + x_l`` with
      ``E_i(x_l) = x_0 * (U_li g(C_li g(V_li^T x_l)) + b_l)``, ``C_li`` of
      shape ``r x r``, ``g = expert_activation`` and the gates
      ``G(x_l) = softmax(W_g x_l)`` over the ``K`` experts (``b_l`` is shared
      by the experts, as in the paper).

    Structure. Alone, the network is the paper's *stacked* structure once the
    architecture's bottom MLP follows it; ``parallel_hidden`` (sizes of an MLP
    that reads ``x_0`` beside the cross network) gives the *parallel*
    structure: the output is ``[cross(x_0), MLP(x_0)]`` concatenated.

    Initialisation: cross matrices Xavier-uniform, biases zero.

    Shapes: ``(B, D) -> (B, output_dim)``; ``output_dim = D``, plus the last
    ``parallel_hidden`` size when given.
    """

    def __init__(
        self,
        input_dim: int,
        num_layers: int = 3,
        low_rank: int | None = None,
        num_experts: int = 1,
        expert_activation: str = "relu",
        parallel_hidden: Sequence[int] = (),
        parallel_activation: str = "relu",
        parallel_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"CrossNetworkV2: num_layers must be >= 1, got {num_layers}")
        if low_rank is not None and low_rank < 1:
            raise ValueError(f"CrossNetworkV2: low_rank must be >= 1 (or None for full rank), got {low_rank}")
        if num_experts < 1:
            raise ValueError(f"CrossNetworkV2: num_experts must be >= 1, got {num_experts}")
        if num_experts > 1 and low_rank is None:
            raise ValueError("CrossNetworkV2: num_experts > 1 is the mixture of low-rank experts; give low_rank too")
        self.input_dim = input_dim
        self.num_layers = num_layers
        self.low_rank = low_rank
        self.num_experts = num_experts
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            if low_rank is None:
                self.layers.append(_FullRankCross(input_dim))
            elif num_experts == 1:
                self.layers.append(_LowRankCross(input_dim, low_rank))
            else:
                self.layers.append(_MixtureCross(input_dim, low_rank, num_experts, expert_activation))
        self.parallel = MLP(input_dim, list(parallel_hidden), activation=parallel_activation,
                            dropout=parallel_dropout) if parallel_hidden else None
        self.output_dim = input_dim + (self.parallel.output_dim if self.parallel is not None else 0)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            _check_shape("CrossNetworkV2", x, [self.input_dim], "(B, D)")
        out = x
        for layer in self.layers:
            out = layer(x, out)  # (B, D)
        if self.parallel is not None:
            out = torch.cat([out, self.parallel(x)], dim=-1)  # (B, D + H)
        return out


def _xavier(*shape: int) -> nn.Parameter:
    """A parameter of ``shape`` whose last two dims are Xavier-uniform initialised (per leading index)."""
    weight = torch.empty(*shape)
    for matrix in weight.view(-1, shape[-2], shape[-1]):
        nn.init.xavier_uniform_(matrix)
    return nn.Parameter(weight)


class _FullRankCross(nn.Module):
    """``x_0 * (W x_l + b) + x_l`` with a full ``D x D`` matrix ``W`` (DCN-v2 eq. 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = _xavier(dim, dim)  # W, (out, in)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * (x @ self.weight.T + self.bias) + x  # (B, D)


class _LowRankCross(nn.Module):
    """``x_0 * (U (V^T x_l) + b) + x_l`` with ``U, V`` of shape ``D x r`` (DCN-v2 eq. 3)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.v = _xavier(dim, rank)  # V
        self.u = _xavier(rank, dim)  # U^T
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * (x @ self.v @ self.u + self.bias) + x  # (B, D)


class _MixtureCross(nn.Module):
    """``sum_i G_i(x_l) x_0 * (U_i g(C_i g(V_i^T x_l)) + b) + x_l``, ``G = softmax(W_g x_l)`` (DCN-v2 eqs. 4-5)."""

    def __init__(self, dim: int, rank: int, num_experts: int, activation: str) -> None:
        super().__init__()
        self.v = _xavier(num_experts, dim, rank)  # V_i
        self.c = _xavier(num_experts, rank, rank)  # C_i^T
        self.u = _xavier(num_experts, rank, dim)  # U_i^T
        self.bias = nn.Parameter(torch.zeros(dim))  # b, shared by the experts
        self.gate = _xavier(dim, num_experts)  # W_g^T
        self.activation = activation_layer(activation)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        h = self.activation(torch.einsum("bd,kdr->bkr", x, self.v))  # (B, K, r): g(V^T x)
        h = self.activation(torch.einsum("bkr,krs->bks", h, self.c))  # (B, K, r): g(C g(V^T x))
        experts = x0.unsqueeze(1) * (torch.einsum("bkr,krd->bkd", h, self.u) + self.bias)  # (B, K, D)
        gates = torch.softmax(x @ self.gate, dim=-1)  # (B, K)
        return torch.einsum("bk,bkd->bd", gates, experts) + x  # (B, D)


class SENet(nn.Module):
    """FiBiNET's SENET layer: re-weights each field's embedding by a learned, input-dependent weight.

    For fields ``E = [e_1 .. e_F]`` (``(B, F, d)``):

    * squeeze: ``z_i = mean(e_i)`` (the paper's mean pooling), ``z`` of shape ``(B, F)``;
    * excitation: ``a = s(W_2 ReLU(W_1 z))``, ``W_1`` of shape
      ``F/r x F`` and ``W_2`` of shape ``F x F/r``, both bias-free as in the
      paper; ``F/r = max(1, F // reduction_ratio)``; ``s`` is
      ``excitation_activation``: ``"relu"`` (default, FiBiNET and DeepCTR) or
      ``"sigmoid"`` (the original SE-Net's gate in ``(0, 1)``);
    * re-weight: ``v_i = a_i e_i``.

    With few fields ``F/r`` is small, and with ReLU a row whose hidden units
    are all negative gets ``a = 0``: every field zeroed, and no gradient for
    that row. ``"sigmoid"`` never zeroes a field.

    Shapes: ``(B, F, d) -> (B, F, d)``, or ``(B, F * d)`` with ``flatten=True``;
    ``output_dim = F * d`` (the flat width).
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        reduction_ratio: int = 3,
        excitation_activation: str = "relu",
        flatten: bool = False,
    ) -> None:
        super().__init__()
        if num_fields < 1 or embedding_dim < 1:
            raise ValueError(f"SENet: num_fields and embedding_dim must be >= 1, got {num_fields}, {embedding_dim}")
        if reduction_ratio < 1:
            raise ValueError(f"SENet: reduction_ratio must be >= 1, got {reduction_ratio}")
        self.num_fields = num_fields
        self.embedding_dim = embedding_dim
        self.flatten = flatten
        reduced = max(1, num_fields // reduction_ratio)
        self.excitation = nn.Sequential(
            nn.Linear(num_fields, reduced, bias=False),
            nn.ReLU(),
            nn.Linear(reduced, num_fields, bias=False),
            activation_layer(excitation_activation),
        )
        self.output_dim = num_fields * embedding_dim

    def field_weights(self, fields: Tensor) -> Tensor:
        """The excitation ``a`` ``(B, F)`` of fields ``(B, F, d)``."""
        if not torch.jit.is_scripting():
            _check_shape("SENet", fields, [self.num_fields, self.embedding_dim], "(B, F, d), one vector per field")
        squeezed = fields.mean(dim=-1)  # (B, F)
        return self.excitation(squeezed)  # (B, F)

    def forward(self, fields: Tensor) -> Tensor:
        out = fields * self.field_weights(fields).unsqueeze(-1)  # (B, F, d)
        return out.flatten(1) if self.flatten else out


class MaskBlock(nn.Module):
    """One MaskBlock of MaskNet: ``ReLU(LayerNorm(W (mask(v_emb) * h)))``.

    ``mask(v_emb) = W_2 ReLU(W_1 v_emb + b_1) + b_2`` is the instance-guided
    mask (eq. 1-2): an aggregation layer of width
    ``round(reduction_ratio * masked_dim)`` then a projection to the width of
    the masked input ``h``. ``W`` (``masked_dim -> output_dim``) is bias-free,
    as LayerNorm follows it (eq. 6-7).

    Shapes: ``forward(masked (B, masked_dim), mask_input (B, mask_input_dim)) -> (B, output_dim)``.
    """

    def __init__(self, mask_input_dim: int, masked_dim: int, output_dim: int, reduction_ratio: float = 2.0) -> None:
        super().__init__()
        aggregation_dim = max(1, round(reduction_ratio * masked_dim))
        self.mask = nn.Sequential(
            nn.Linear(mask_input_dim, aggregation_dim), nn.ReLU(), nn.Linear(aggregation_dim, masked_dim)
        )
        self.hidden = nn.Linear(masked_dim, output_dim, bias=False)
        self.norm = nn.LayerNorm(output_dim)
        self.output_dim = output_dim

    def forward(self, masked: Tensor, mask_input: Tensor) -> Tensor:
        weighted = self.mask(mask_input) * masked  # (B, masked_dim)
        return torch.relu(self.norm(self.hidden(weighted)))  # (B, output_dim)


class MaskNet(nn.Module):
    """MaskNet: MaskBlocks whose masks are computed from the input embedding of each instance.

    ``v_emb`` is the flat input ``(B, D)``; ``LN_EMB(v_emb)`` its layer
    normalisation, per field when ``field_dims`` lists the fields' widths (the
    paper's choice: each field normalised on its own; a width-1 field, a
    scalar dense value, is left as it is, since a LayerNorm of one value is a
    constant), else over the whole vector.

    * ``mode="serial"`` (SerMaskNet): ``h_1 = MaskBlock_1(LN_EMB(v_emb), v_emb)``,
      ``h_k = MaskBlock_k(h_{k-1}, v_emb)``; the output is ``h_K``
      (``block_dim`` wide).
    * ``mode="parallel"`` (ParaMaskNet): ``K`` MaskBlocks on
      ``LN_EMB(v_emb)``, concatenated (``K * block_dim`` wide), then the MLP
      ``parallel_hidden`` when given (the paper's feed-forward layers on top of
      the concatenation).

    Every block's mask reads the raw ``v_emb``. Shapes: ``(B, D) -> (B, output_dim)``.
    """

    def __init__(
        self,
        input_dim: int,
        mode: str = "serial",
        num_blocks: int = 3,
        block_dim: int = 64,
        reduction_ratio: float = 2.0,
        field_dims: Sequence[int] | None = None,
        parallel_hidden: Sequence[int] = (),
        parallel_activation: str = "relu",
        parallel_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in ("serial", "parallel"):
            raise ValueError(f"MaskNet: mode must be 'serial' or 'parallel', got {mode!r}")
        if num_blocks < 1 or block_dim < 1:
            raise ValueError(f"MaskNet: num_blocks and block_dim must be >= 1, got {num_blocks}, {block_dim}")
        if reduction_ratio <= 0:
            raise ValueError(f"MaskNet: reduction_ratio must be > 0, got {reduction_ratio}")
        if field_dims is not None:
            field_dims = [int(width) for width in field_dims]
            if sum(field_dims) != input_dim or min(field_dims, default=0) < 1:
                raise ValueError(
                    f"MaskNet: field_dims {field_dims} must be positive widths summing to input_dim={input_dim}"
                )
        if mode == "serial" and parallel_hidden:
            raise ValueError("MaskNet: parallel_hidden is the MLP of mode='parallel'; serial mode has none")
        self.input_dim = input_dim
        self.mode = mode
        self.field_dims = field_dims if field_dims is not None else [input_dim]
        self.field_norms = nn.ModuleList(
            nn.LayerNorm(width) if width > 1 else nn.Identity() for width in self.field_dims
        )
        if mode == "serial":
            widths = [input_dim] + [block_dim] * (num_blocks - 1)
        else:
            widths = [input_dim] * num_blocks
        self.blocks = nn.ModuleList(MaskBlock(input_dim, width, block_dim, reduction_ratio) for width in widths)
        self.parallel = (
            MLP(num_blocks * block_dim, list(parallel_hidden), activation=parallel_activation, dropout=parallel_dropout)
            if parallel_hidden else None
        )
        if mode == "serial":
            self.output_dim = block_dim
        else:
            self.output_dim = self.parallel.output_dim if self.parallel is not None else num_blocks * block_dim

    def normalized_embedding(self, x: Tensor) -> Tensor:
        """``LN_EMB(v_emb)``: each field layer-normalised on its own (width-1 fields unchanged), ``(B, D)``."""
        if len(self.field_dims) == 1:
            return self.field_norms[0](x)
        parts = torch.split(x, self.field_dims, dim=-1)  # F tensors (B, d_f)
        normalized: list[Tensor] = []
        for index, norm in enumerate(self.field_norms):
            normalized.append(norm(parts[index]))
        return torch.cat(normalized, dim=-1)  # (B, D)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            _check_shape("MaskNet", x, [self.input_dim], "(B, D)")
        normalized = self.normalized_embedding(x)  # (B, D)
        if self.mode == "serial":
            h = normalized
            for block in self.blocks:
                h = block(h, x)  # (B, block_dim)
            return h
        h = torch.cat([block(normalized, x) for block in self.blocks], dim=-1)  # (B, K * block_dim)
        return self.parallel(h) if self.parallel is not None else h
