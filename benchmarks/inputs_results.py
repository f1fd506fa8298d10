"""Quality of the inputs: MMoE and PLE with the history mean-pooled vs read by DIN vs by a BST transformer, each
with and without a DCN-v2 cross network, over several seeds, through the library (ParquetDataModule +
MultiTaskLightningModule + Trainer).

    python benchmarks/inputs_results.py --update          # writes benchmarks/results/inputs.md
    python benchmarks/inputs_results.py --seeds 1         # one seed, printed only

Data:

* **synthetic** (always): ``datamodules.synthetic_sequences``, whose click depends on the candidate and the
  history jointly (how many history items share the candidate's category, whether the candidate was seen).
  ``--rows`` train / ``--val-rows`` / ``--test-rows`` rows (row seeds 0, 1, 2), histories of up to
  ``--history`` clicks, both joint effects at weight ``--joint-weight``. Features: the candidate
  (``item_id``, ``category``), two dense values and the history group (``hist_item`` + ``hist_category``,
  sharing the candidate's tables); with ``--no-user-id`` (default) ``user_id`` is left out: with 20k users
  and a few rows each, its table only memorises noise at these sizes. Tasks: click, conversion (on clicks),
  dwell (regression). Reported: test click AUC and conversion AUC.
* **MovieLens-1M** (where converted: ``--movielens DIR``, default ``$MTL_MOVIELENS_DIR`` else
  ``data/movielens``, holding ``ml-1m/{train,val,test}.parquet`` and ``meta.json`` from
  ``python -m datamodules.movielens download DIR``): ``datamodules.movielens.movielens_features`` with
  ``hist_movie`` + ``hist_genre`` as the history group queried by ``movie_id`` + ``genre``; tasks like and
  rating. Reported: test like AUC and rating MSE. Absent: the report says so.

The encoders: ``din`` (DIN's activation unit, default options), ``transformer`` (BST, one layer, 2 heads,
the candidate's output); the sequence group is queried by the candidate's embeddings. The interaction:
``dcn_v2`` with 2 full-rank cross layers. Every run: Adam ``--lr`` for the dense part, ``--embedding-lr`` for
the tables, batch ``--batch-size``, ``--epochs`` epochs, the model of the last epoch tested (no early
stopping). Runs go to ``--jobs`` worker processes of ``--threads`` torch threads each.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

POOLINGS = ("mean", "din", "transformer")
ARCHITECTURES = {
    "mmoe": dict(num_experts=3, expert_hidden=(32,), tower_hidden=(16,)),
    "ple": dict(num_levels=2, num_specific_experts=1, num_shared_experts=1, expert_hidden=(32,), tower_hidden=(16,)),
}
INTERACTIONS: dict[str, Any] = {"none": None, "dcn_v2": {"name": "dcn_v2", "num_layers": 2}}
POOLING_OPTIONS: dict[str, dict[str, Any]] = {"din": {}, "transformer": {"num_heads": 2, "num_layers": 1}}
RESULTS = HERE / "results" / "inputs.md"


@dataclasses.dataclass(frozen=True)
class Run:
    dataset: str  # "synthetic" or "movielens-1m"
    folder: str
    architecture: str
    pooling: str
    interaction: str
    seed: int
    settings: tuple[tuple[str, Any], ...]


def encode(features: list, pooling: str, query: dict[str, str]) -> list:
    """``features`` with the history sequences named in ``query`` grouped and read by ``pooling``."""
    if pooling == "mean":
        return features
    options = POOLING_OPTIONS[pooling] or None
    return [dataclasses.replace(f, pooling=pooling, query=query[f.name], group="hist", pooling_options=options)
            if f.name in query else f for f in features]


def dataset_spec(run: Run) -> tuple[list, list, dict[str, str], list[tuple[str, str]]]:
    """Features, tasks, the history's queries and the reported ``(metric key, label)`` pairs of ``run``'s data."""
    settings = dict(run.settings)
    if run.dataset == "synthetic":
        from datamodules.synthetic_sequences import sequence_features, sequence_tasks

        features = sequence_features(settings["embedding_dim"], settings["history"])
        if settings["no_user_id"]:
            features = [f for f in features if f.name != "user_id"]
        return (features, sequence_tasks(), {"hist_item": "item_id", "hist_category": "category"},
                [("test/click/auc", "click AUC"), ("test/conversion/auc", "conversion AUC")])
    from datamodules.movielens import movielens_features, movielens_tasks

    return (movielens_features(run.folder, settings["embedding_dim"]), movielens_tasks(),
            {"hist_movie": "movie_id", "hist_genre": "genre"},
            [("test/like/auc", "like AUC"), ("test/rating/mse", "rating MSE")])


def train_one(run: Run) -> dict[str, Any]:
    """Train and test one configuration in this (worker) process; its metrics and seconds."""
    import logging
    import warnings

    import lightning as L
    import torch

    from datamodules import ParquetDataModule
    from mtl_lightning import MultiTaskLightningModule, registry

    settings = dict(run.settings)
    torch.set_num_threads(settings["threads"])
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    started = time.perf_counter()
    features, tasks, query, metrics = dataset_spec(run)
    features = encode(features, run.pooling, query)
    folder = Path(run.folder)
    L.seed_everything(run.seed, verbose=False)
    dm = ParquetDataModule(train=folder / "train.parquet", val=folder / "val.parquet", test=folder / "test.parquet",
                           features=features, tasks=tasks, batch_size=settings["batch_size"], progress=False)
    model = registry.create(run.architecture, features=features, tasks=tasks,
                            interaction=INTERACTIONS[run.interaction], **ARCHITECTURES[run.architecture])
    module = MultiTaskLightningModule(model, lr=settings["lr"], embedding_lr=settings["embedding_lr"])
    trainer = L.Trainer(max_epochs=settings["epochs"], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, dm)
    found = trainer.test(module, dm, verbose=False)[0]
    return {"run": run, "metrics": {key: float(found[key]) for key, _ in metrics},
            "seconds": time.perf_counter() - started}


def synthetic_folder(args: argparse.Namespace) -> Path:
    from datamodules.synthetic_sequences import write_sequence_synthetic

    folder = HERE / ".cache" / (f"inputs-synthetic-{args.rows}-{args.val_rows}-{args.test_rows}-h{args.history}"
                                f"-w{args.joint_weight:g}")
    if not (folder / "test.parquet").exists():
        write_sequence_synthetic(folder, (args.rows, args.val_rows, args.test_rows), seed=0,
                                 max_history=args.history, match_weight=args.joint_weight,
                                 seen_weight=args.joint_weight)
    return folder


def movielens_folder(args: argparse.Namespace) -> tuple[Path | None, str]:
    """The converted ML-1M folder, or ``None`` and why it is absent."""
    from datamodules.movielens import MOVIELENS_ENV, movielens_dir

    base = movielens_dir(args.movielens)
    folder = base / "ml-1m"
    if all((folder / name).is_file() for name in ("train.parquet", "val.parquet", "test.parquet", "meta.json")):
        return folder, ""
    return None, (f"MovieLens-1M is absent: {folder} holds no converted split (set ${MOVIELENS_ENV} or --movielens "
                  f"DIR after `python -m datamodules.movielens download DIR`)")


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def tables(dataset: str, done: list[dict[str, Any]]) -> list[str]:
    """One markdown table per reported metric: rows architecture x interaction, columns the poolings."""
    runs = [r for r in done if r["run"].dataset == dataset]
    if not runs:
        return []
    keys = list(runs[0]["metrics"])
    _, _, _, labels = dataset_spec(runs[0]["run"])
    lines: list[str] = []
    for key in keys:
        label = dict(labels)[key]
        lines += [f"**{label}** (test; mean ± std over seeds)", "",
                  "| architecture | interaction | " + " | ".join(POOLINGS) + " | seeds |",
                  "|---|---|" + "---|" * len(POOLINGS) + "---|"]
        for architecture in ARCHITECTURES:
            for interaction in INTERACTIONS:
                cells, seeds = [], set()
                for pooling in POOLINGS:
                    values = [r["metrics"][key] for r in runs if (r["run"].architecture, r["run"].interaction,
                                                                  r["run"].pooling) == (architecture, interaction,
                                                                                        pooling)]
                    seeds.add(len(values))
                    cells.append(summary(values) if values else "")
                lines.append(f"| `{architecture}` | {interaction} | " + " | ".join(cells) + f" | "
                             f"{'/'.join(str(s) for s in sorted(seeds))} |")
        lines.append("")
    return lines


def report(args: argparse.Namespace, done: list[dict[str, Any]], missing: str, minutes: float, command: str) -> str:
    seeds = args.seeds
    lines = [
        "# Inputs: sequence encoders and feature crosses", "",
        f"Produced by `{command}` ({seeds} seed{'s' if seeds > 1 else ''}, {minutes:.0f} min with {args.jobs} "
        f"parallel run(s) of {args.threads} CPU thread(s) on the shared 2-core machine). Every run: Adam lr "
        f"{args.lr:g} for the dense part, `embedding_lr={args.embedding_lr:g}` for the tables, batch "
        f"{args.batch_size}, {args.epochs} epoch(s), embedding dim {args.embedding_dim}, the last epoch's model tested. "
        "MMoE: 3 experts [32], towers [16]; PLE: 2 levels, 1 specific + 1 shared expert per task, experts [32], "
        "towers [16]. `din`: DIN's activation unit at its defaults; `transformer`: BST, 1 layer, 2 heads, the "
        "candidate's output; both read the history group (`group=\"hist\"`) with the candidate as the query. "
        "`dcn_v2`: 2 full-rank cross layers in front of the experts. Protocol: `benchmarks/inputs_results.py`.",
        "",
        f"## Synthetic behaviour sequences ({args.rows:,} train / {args.val_rows:,} val / {args.test_rows:,} test rows)",
        "",
        f"`datamodules.synthetic_sequences` with histories of up to {args.history} clicks and both joint effects "
        f"(category match, candidate seen) at weight {args.joint_weight:g}; features: the candidate (`item_id`, "
        "`category`), `dense_0`, `dense_1` and the history group (`hist_item` + `hist_category`, sharing the "
        "candidate's tables)" + ("; `user_id` left out (20k users with a few rows each: its table memorises "
                                  "noise at this size)" if args.no_user_id else "") + ".",
        "",
        *tables("synthetic", done),
        "## MovieLens-1M", "",
    ]
    if missing:
        lines += [missing + ".", ""]
    else:
        lines += [f"`datamodules.movielens` (ML-1M, time-based split), {args.movielens_epochs} epoch(s).", "",
                  *tables("movielens-1m", done)]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--val-rows", type=int, default=2_000)
    parser.add_argument("--test-rows", type=int, default=10_000)
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--joint-weight", type=float, default=2.0)
    parser.add_argument("--no-user-id", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--movielens-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--embedding-lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--embedding-dim", type=int, default=8)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--movielens", default=None, help="folder holding ml-1m/ (default $MTL_MOVIELENS_DIR, "
                        "else data/movielens)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--update", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    for name in [a for a in ARCHITECTURES if a not in args.architectures]:
        del ARCHITECTURES[name]
    command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])
    started = time.perf_counter()
    datasets = [("synthetic", synthetic_folder(args), args.epochs)]
    folder, missing = movielens_folder(args)
    print(missing or f"MovieLens-1M: {folder}", flush=True)
    if folder is not None:
        datasets.append(("movielens-1m", folder, args.movielens_epochs))
    runs = []
    for dataset, path, epochs in datasets:
        settings = dict(embedding_dim=args.embedding_dim, history=args.history, no_user_id=args.no_user_id,
                        threads=args.threads, batch_size=args.batch_size, lr=args.lr,
                        embedding_lr=args.embedding_lr, epochs=epochs)
        runs += [Run(dataset, str(path), architecture, pooling, interaction, seed, tuple(sorted(settings.items())))
                 for seed in range(args.seeds) for architecture in ARCHITECTURES for interaction in INTERACTIONS
                 for pooling in POOLINGS]
    done: list[dict[str, Any]] = []
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in pool.map(train_one, runs):
            run = result["run"]
            done.append(result)
            print(f"[{len(done)}/{len(runs)}] {run.dataset} {run.architecture} {run.pooling} {run.interaction} "
                  f"seed {run.seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
                  + f" ({result['seconds']:.0f} s)", flush=True)
    text = report(args, done, missing, (time.perf_counter() - started) / 60, command)
    print("\n" + text)
    if args.update:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
