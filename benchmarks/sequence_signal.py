"""Is there a sequence signal in ``datamodules.synthetic_sequences``? A hand-written pair, plain PyTorch (no library).

Both models read the same inputs -- ``user_id``, the candidate (``item_id`` + ``category`` embeddings), two dense
values and the history (``hist_item`` + ``hist_category`` embeddings, concatenated per position) -- and end in the
same MLP (128, 64) for the click logit. They differ only in how the history becomes one vector:

* ``mean``: the mean of the valid positions' embeddings;
* ``din``: DIN's activation unit (Zhou et al., KDD 2018): an MLP (64, 32, PReLU) over ``[q, k, q - k, q * k]`` per
  position, ``q`` the candidate's embedding, gives each valid position a weight (no softmax, as in the paper); the
  weighted sum of the positions is the history vector.

Tables start from N(0, 0.05) as the library draws them; Adam, batch 1024, on the train split, click AUC on the test
split, for each learning rate given. The generator's true click probability gives the best reachable AUC.

    python benchmarks/sequence_signal.py                        # 160k/40k rows, 2 epochs, lr 1e-2 and 2e-3
    python benchmarks/sequence_signal.py --rows 100000 --epochs 3 --lr 1e-2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
import sys

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.columns import pad_lists  # noqa: E402
from datamodules.synthetic_sequences import NUM_CATEGORIES, NUM_ITEMS, NUM_USERS, make_sequence_table  # noqa: E402


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class ClickModel(nn.Module):
    def __init__(self, pooling: str, dim: int = 16) -> None:
        super().__init__()
        self.pooling = pooling
        self.user = nn.Embedding(NUM_USERS + 1, dim)
        self.item = nn.Embedding(NUM_ITEMS + 1, dim)
        self.category = nn.Embedding(NUM_CATEGORIES + 1, dim)
        for table in (self.user, self.item, self.category):
            nn.init.normal_(table.weight, std=0.05)
        self.attention = mlp([8 * dim, 64, 32, 1], nn.PReLU) if pooling == "din" else None
        self.top = mlp([dim + 2 * dim + 2 + 2 * dim, 128, 64, 1])

    def forward(self, user, item, category, dense, hist_item, hist_category) -> torch.Tensor:
        query = torch.cat([self.item(item), self.category(category)], dim=-1)  # (B, 2d)
        keys = torch.cat([self.item(hist_item), self.category(hist_category)], dim=-1)  # (B, L, 2d)
        mask = (hist_item != 0).unsqueeze(-1).float()  # (B, L, 1)
        if self.attention is None:
            pooled = (keys * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:
            q = query.unsqueeze(1).expand_as(keys)
            weights = self.attention(torch.cat([q, keys, q - keys, q * keys], dim=-1)) * mask  # (B, L, 1)
            pooled = (weights * keys).sum(1)
        return self.top(torch.cat([self.user(user), query, dense, pooled], dim=-1)).squeeze(-1)


def tensors(table, max_history: int) -> dict[str, torch.Tensor]:
    column = lambda name: torch.from_numpy(table.column(name).to_numpy())  # noqa: E731
    return {
        "user": column("user_id"), "item": column("item_id"), "category": column("category"),
        "dense": torch.stack([column("dense_0"), column("dense_1")], dim=1),
        "hist_item": torch.from_numpy(pad_lists(table.column("hist_item"), max_history)),
        "hist_category": torch.from_numpy(pad_lists(table.column("hist_category"), max_history)),
        "click": column("click"),
    }


def run(pooling: str, lr: float, train: dict, test: dict, epochs: int, batch_size: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = ClickModel(pooling)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    inputs = ("user", "item", "category", "dense", "hist_item", "hist_category")
    n = train["click"].numel()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            logits = model(*(train[k][rows] for k in inputs))
            loss = nn.functional.binary_cross_entropy_with_logits(logits, train["click"][rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        scores = torch.cat([model(*(test[k][i:i + 8192] for k in inputs)) for i in range(0, test["click"].numel(), 8192)])
    return float(binary_auroc(scores, test["click"].long()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=160_000, help="train rows (test: a quarter of it)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-2, 2e-3])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--max-history", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_table = make_sequence_table(args.rows, seed=args.seed, max_history=args.max_history)
    test_table = make_sequence_table(args.rows // 4, seed=args.seed + 2, max_history=args.max_history,
                                     with_truth=True)
    train, test = tensors(train_table, args.max_history), tensors(test_table, args.max_history)
    best = float(binary_auroc(torch.from_numpy(test_table.column("p_click").to_numpy()), test["click"].long()))
    print(f"{args.rows} train / {args.rows // 4} test rows, {args.epochs} epochs, batch {args.batch_size}, "
          f"click rate {train['click'].mean():.3f}; true-probability AUC {best:.4f}")
    print("| Adam lr | mean pooling + MLP | DIN + MLP | seconds |")
    print("|---|---|---|---|")
    for lr in args.lr:
        start = time.perf_counter()
        mean = run("mean", lr, train, test, args.epochs, args.batch_size, args.seed)
        din = run("din", lr, train, test, args.epochs, args.batch_size, args.seed)
        print(f"| {lr:g} | {mean:.4f} | {din:.4f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
