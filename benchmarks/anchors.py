"""One measurement of an anchor library (nextrec or torch-rechub), run inside `.venv-anchors`.

Started by ``benchmarks/throughput.py`` as a child process with the anchors'
Python; it imports neither mtl-lightning nor Lightning. Each library trains its
own MMoE of the benchmark's shape through its normal API (the MMoE paper's
model: 4 experts [256, 128], towers [64], embedding dim 16, Adam lr 1e-3,
batch 2048). Rows/s is timed the same way as for every other system: a
forward pre-hook on the model stamps the start of each training step; the
first ``warmup`` steps are left out and training stops after ``steps`` timed
steps. It prints one ``RESULT {json}`` line.

Library-specific notes: torch-rechub has no ignore label, so the conversion
label's -1 (not clicked) is given to it as 0; its MLPs always carry BatchNorm.
nextrec reads the Parquet file itself (its ``fit(train_data=path)``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (stdlib and bench_data only at import time)
from bench_data import DENSE, EMBEDDING_DIM, SEQ_LEN, SEQ_VOCAB, SEQUENCE, SPARSE, SPARSE_VOCABS, padded_history  # noqa: E402

TARGETS = ["click", "conversion", "dwell"]


class Stop(Exception):
    """Raised by the timing hook once the timed steps are done."""


class StepClock(throughput.StepClock):
    """The project benchmark's clock; also raises ``Stop`` once the timed steps are done (the anchors' own
    training loops cannot be told to stop after N steps)."""

    def __call__(self, module, args) -> None:
        super().__call__(module, args)
        if len(self.stamps) > self.warmup + self.steps:
            raise Stop


def rechub(train: Path, clock: StepClock, batch_size: int, device: str) -> None:
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    table = pq.read_table(train)
    x = {name: table.column(name).to_numpy() for name in SPARSE + DENSE}
    x[SEQUENCE] = padded_history(table.column(SEQUENCE))
    labels = {name: table.column(name).to_numpy().astype(np.float32) for name in TARGETS}
    labels["conversion"] = np.maximum(labels["conversion"], 0.0)  # no ignore label in torch-rechub
    y = np.stack([labels[name] for name in TARGETS], axis=1)
    features = (
        [SparseFeature(name, vocab, embed_dim=EMBEDDING_DIM) for name, vocab in zip(SPARSE, SPARSE_VOCABS)]
        + [DenseFeature(name) for name in DENSE]
        + [SequenceFeature(SEQUENCE, SEQ_VOCAB, embed_dim=EMBEDDING_DIM, pooling="mean", padding_idx=0)]
    )
    task_types = ["classification", "classification", "regression"]
    model = MMOE(features, task_types, n_expert=4, expert_params={"dims": [256, 128]},
                 tower_params_list=[{"dims": [64]}] * 3)
    model.register_forward_pre_hook(clock)
    small = {k: v[:batch_size] for k, v in x.items()}
    loader, _, _ = DataGenerator(x, y).generate_dataloader(small, y[:batch_size], small, y[:batch_size],
                                                           batch_size=batch_size)
    trainer = MTLTrainer(model, task_types, optimizer_params={"lr": 1e-3, "weight_decay": 0.0}, n_epoch=1,
                         device=device, model_path=tempfile.mkdtemp())
    try:
        trainer.train_one_epoch(loader)
    except Stop:
        pass


def nextrec(train: Path, clock: StepClock, batch_size: int, device: str) -> None:
    from nextrec.basic.features import DenseFeature, SequenceFeature, SparseFeature
    from nextrec.models.multitask.mmoe import MMOE

    model = MMOE(
        dense_features=[DenseFeature(name) for name in DENSE],
        sparse_features=[SparseFeature(name, vocab_size=vocab, embedding_dim=EMBEDDING_DIM)
                         for name, vocab in zip(SPARSE, SPARSE_VOCABS)],
        sequence_features=[SequenceFeature(SEQUENCE, vocab_size=SEQ_VOCAB, max_len=SEQ_LEN,
                                           embedding_dim=EMBEDDING_DIM, combiner="mean", padding_idx=0)],
        expert_mlp_params={"hidden_dims": [256, 128]},
        num_experts=4,
        tower_mlp_params_list=[{"hidden_dims": [64]}] * 3,
        target=TARGETS,
        task=["binary", "binary", "regression"],
        device=device,
    )
    model.compile(optimizer="adam", optimizer_params={"lr": 1e-3}, loss=["bce", "bce", "mse"], ignore_label=-1)
    model.register_forward_pre_hook(clock)
    try:
        model.fit(train_data=str(train), epochs=1, batch_size=batch_size, shuffle=True, use_tensorboard=False,
                  metrics={"click": ["auc"], "conversion": ["auc"], "dwell": ["mse"]})
    except Stop:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=["nextrec", "torch-rechub"])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = StepClock(args.warmup, args.steps, args.device.startswith("cuda"))
    train = args.train.resolve()
    os.chdir(tempfile.mkdtemp(prefix=f"bench-{args.system}-"))  # their log and checkpoint folders go here
    run = nextrec if args.system == "nextrec" else rechub
    run(train, clock, args.batch_size, args.device)
    if len(clock.stamps) <= args.warmup + args.steps:
        raise SystemExit(f"{args.system}: only {len(clock.stamps)} training steps ran; the dataset is too small "
                         f"for --warmup {args.warmup} --steps {args.steps}")
    rows = args.steps * args.batch_size
    print("RESULT " + json.dumps({
        "rows_per_s": rows / clock.seconds(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }), flush=True)


if __name__ == "__main__":
    main()
