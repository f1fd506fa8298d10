"""Quality on real data: every architecture and every weighting strategy on UCI Census-Income.

Protocol (``datamodules/census.py``): the UCI test file as a pool, permuted with
``numpy.random.RandomState(2024)``, 50 % train / 25 % val / 25 % test, category
ids fitted on train; tasks ``income`` and ``never_married``. Every registered
architecture that can be built for two binary tasks is trained through
``Trainer`` + ``ParquetDataModule`` with early stopping on ``val/loss``; the
test AUC of the best validation checkpoint is reported as mean ± std over
seeds, next to the single-task references and published PaddleRec numbers.

Multi-scenario architectures (``multi_scenario = True``) get a domain
derived from the census column ``sex`` (2 domains: its two values, ids 0 and 1),
kept as a feature too.
Architectures whose outputs are not the given tasks (ESMM/ESCM model a
click -> conversion funnel with a fixed ctr/cvr/ctcvr output set) are listed as
not applicable with the reason.

    python -m datamodules.census download data/census   # once: the data (or MTL_CENSUS_DIR / --data-dir)
    python benchmarks/quality.py            # 3 seeds, up to 12 epochs
    python benchmarks/quality.py --quick    # 1 seed, up to 3 epochs (< 10 minutes on 2 cores)
    python benchmarks/quality.py --architectures mmoe --weightings modo pe_ltr --update

Writes ``benchmarks/results/census.md`` (or ``--output``), rewritten after every finished run, so an
interrupted run leaves the rows it finished (each row says over how many seeds). ``--update`` keeps
the rows of the existing file that this run does not redo (and its header line, with this run's
command added). Runs are ordered seed by seed, so every row gets its first seed before any its second.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules import ParquetDataModule  # noqa: E402
from datamodules.census import CENSUS_ENV, census_dir, census_source, prepare_census  # noqa: E402
from mtl_lightning import MultiTaskLightningModule, SparseFeature, registry  # noqa: E402
from mtl_lightning import weighting as weighting_strategies  # noqa: E402

REFERENCES = [
    ("logistic regression, one-hot (single-task)", "0.9405", "0.9939"),
    ("HistGradientBoosting (single-task)", "0.9459", "0.9943"),
    ("PaddleRec MMoE, full data (max / mean)", "0.9494 / 0.9447", "0.9942 / 0.9932"),
    ("PaddleRec Shared-Bottom, full data (max / mean)", "0.9499 / 0.9312", "0.9938 / 0.9926"),
]
TARGET = {"income": 0.9405 - 0.005, "never_married": 0.9939 - 0.005}
DOMAIN_COLUMN = "sex"


def add_domain(paths: dict[str, Path], features: list) -> list:
    """Add a ``domain`` column (the census ``sex`` ids shifted to 0/1) to every split; returns the new specs."""
    for path in paths.values():
        table = pq.read_table(path)
        domain = pc.subtract(table[DOMAIN_COLUMN], 1)
        if pc.min(domain).as_py() < 0:
            raise ValueError(f"{path}: column {DOMAIN_COLUMN!r} has a value unseen in train")
        pq.write_table(table.append_column("domain", domain.cast(pa.int64())), path)
    return [*features, SparseFeature("domain", 2, features[0].embedding_dim)]


def build_model(name: str, features: list, tasks: list):
    """The architecture with its default hyper-parameters, a domain for multi-scenario ones, or a reason to skip."""
    cls = registry.get(name)
    kwargs = {}
    if cls.multi_scenario:
        kwargs.update(domain_feature="domain", num_domains=2)
    try:
        model = cls(features=features, tasks=tasks, **kwargs)
    except (ValueError, TypeError) as error:
        return None, str(error)
    missing = [t.name for t in tasks if t.name not in model.task_names]
    if missing:
        return None, f"outputs {model.task_names} do not include {missing}"
    return model, ""


def run(model, tasks, paths, features, seed: int, max_epochs: int, weighting="static") -> dict[str, float]:
    dm = ParquetDataModule(train=paths["train"], val=paths["val"], test=paths["test"], tasks=tasks,
                           features=features, batch_size=512, seed=seed)
    module = MultiTaskLightningModule(model, lr=1e-3, weighting=weighting)
    with tempfile.TemporaryDirectory() as ckpt_dir:
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/loss", mode="min")
        trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[EarlyStopping("val/loss", patience=2), checkpoint])
        trainer.fit(module, dm)
        result = trainer.test(module, dm, ckpt_path=checkpoint.best_model_path, verbose=False)[0]
    return {t.name: float(result[f"test/{t.name}/auc"]) for t in tasks}


def run_job(name, strategy, seed, paths, features, tasks, max_epochs, threads) -> dict[str, float]:
    """One (architecture, weighting, seed) training run, in its own process."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    L.seed_everything(seed, verbose=False)
    model, reason = build_model(name, features, tasks)
    if model is None:
        raise ValueError(f"{name}: {reason}")
    return run(model, tasks, paths, features, seed, max_epochs, weighting=strategy)


def summarise(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, at most 3 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=12)
    parser.add_argument("--architectures", nargs="*", help="names to run (default: every registered one)")
    parser.add_argument("--weightings", nargs="*", help="strategies for the MMoE table (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="training runs in parallel processes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "census.md")
    parser.add_argument("--update", action="store_true",
                        help="keep the existing file's rows that this run does not redo")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"the Census folder (default: ${CENSUS_ENV}, else data/census); "
                             "`python -m datamodules.census download DIR` fills it")
    args = parser.parse_args()
    seeds = 1 if args.quick else args.seeds
    max_epochs = 3 if args.quick else args.max_epochs
    warnings.filterwarnings("ignore")
    try:
        source = census_source(args.data_dir)
    except FileNotFoundError as error:
        raise SystemExit(f"{error}\n(from the Makefile: make census CENSUS_DIR={census_dir(args.data_dir)})") from None
    print(f"Census-Income from {census_dir(args.data_dir)}", flush=True)

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="census-"))
    paths, features, tasks = prepare_census(source, work)
    features = add_domain(paths, features)
    names = registry.names() if args.architectures is None else args.architectures  # ``--architectures``: none
    strategies = args.weightings or sorted(weighting_strategies.STRATEGIES)
    skipped = []
    runnable = []
    for name in names:
        model, reason = build_model(name, features, tasks)
        if model is None:
            skipped.append((name, reason))
        else:
            runnable.append(name)
    jobs = [(name, "static", seed) for seed in range(seeds) for name in runnable]
    jobs += [("mmoe", strategy, seed) for seed in range(seeds) for strategy in strategies if strategy != "static"]
    kept = read_rows(args.output) if args.update else {}
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {pool.submit(run_job, name, strategy, seed, paths, features, tasks, max_epochs,
                               args.threads): (name, strategy) for name, strategy, seed in jobs}
        for future in concurrent.futures.as_completed(futures):
            key = futures[future]
            scores = results.setdefault(key, {t.name: [] for t in tasks})
            for task, auc in future.result().items():
                scores[task].append(auc)
            print(f"{key[0]:<14} {key[1]:<12} " + "  ".join(f"{t}: {v[-1]:.4f}" for t, v in scores.items()),
                  flush=True)
            write(args, results, kept, skipped, seeds, max_epochs, started, runnable, strategies)
    write(args, results, kept, skipped, seeds, max_epochs, started, runnable, strategies)
    print(f"wrote {args.output} in {(time.monotonic() - started) / 60:.1f} min")


def read_rows(path: Path) -> dict:
    """The existing file's header line and table rows by section: ``{"header": str, "arch": {name: line}, ...}``."""
    if not path.exists():
        return {}
    rows: dict = {"header": "", "arch": {}, "weighting": {}, "skipped": []}
    section = None
    for line in path.read_text().splitlines():
        if line.startswith("Produced by"):
            rows["header"] = line
        elif line.startswith("## Architectures"):
            section = "arch"
        elif line.startswith("## MMoE with every weighting"):
            section = "weighting"
        elif line.startswith("## Not applicable"):
            section = "skipped"
        elif line.startswith("## "):
            section = None
        elif section == "skipped" and line.startswith("- `"):
            rows["skipped"].append(line)
        elif section in ("arch", "weighting") and line.startswith("| `"):
            rows[section][line.split("`")[1]] = line
    return rows


def row(name: str, scores: dict[str, list[float]]) -> str:
    ok = all(statistics.mean(scores[t]) >= TARGET[t] for t in TARGET)
    return (f"| `{name}` | {summarise(scores['income'])} | {summarise(scores['never_married'])} | "
            f"{'yes' if ok else 'no'} | {len(scores['income'])} |")


def write(args, results, kept, skipped, seeds, max_epochs, started, runnable, strategies) -> None:
    minutes = (time.monotonic() - started) / 60
    command = " ".join(["python benchmarks/quality.py", *sys.argv[1:]])
    this_run = (f"`{command}` ({seeds} seed{'s' if seeds > 1 else ''}, at most {max_epochs} epochs, early "
                f"stopping on val/loss with patience 2, test AUC of the best validation checkpoint; {minutes:.0f} min "
                f"so far with {args.jobs} parallel run(s) of {args.threads} CPU thread(s))")
    header = (f"Produced by {this_run}. Protocol: `datamodules/census.py` (UCI test file as pool, "
              "50/25/25 split with RandomState(2024)); every architecture with its default hyper-parameters, "
              "embedding dim 8, Adam lr 1e-3, batch 512. Multi-scenario architectures use the census column "
              "`sex` as a 2-value domain. Target: test AUC >= logistic regression - 0.005 "
              f"(income >= {TARGET['income']:.4f}, never_married >= {TARGET['never_married']:.4f}).")
    if kept.get("header"):
        header = kept["header"] + f" Rows redone by {this_run}."
    arch_rows = merge(kept.get("arch", {}), {name: results[(name, "static")] for name in runnable
                                             if (name, "static") in results})
    weight_rows = merge(kept.get("weighting", {}), {s: results[("mmoe", s)] for s in strategies
                                                   if ("mmoe", s) in results})
    lines = ["# Census-Income quality benchmark", "", header, "", "## Architectures (test AUC, mean ± std over seeds)",
             "", "| architecture | income | never_married | meets target | seeds |", "|---|---|---|---|---|"]
    lines += [with_seeds(arch_rows[name]) for name in sorted(arch_rows)]
    lines += ["", "## References (not run here)", "", "| model | income | never_married |", "|---|---|---|"]
    lines += [f"| {model} | {income} | {married} |" for model, income, married in REFERENCES]
    lines += ["", "## MMoE with every weighting strategy (test AUC)", "",
              "| weighting | income | never_married | meets target | seeds |", "|---|---|---|---|---|"]
    lines += [with_seeds(weight_rows[name]) for name in sorted(weight_rows)]
    not_applicable = {line.split("`")[1]: line for line in kept.get("skipped", [])}
    not_applicable.update({name: f"- `{name}`: {reason}" for name, reason in skipped})
    if not_applicable:
        lines += ["", "## Not applicable to two independent binary tasks", ""]
        lines += [not_applicable[name] for name in sorted(not_applicable)]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")


def merge(kept: dict[str, str], new: dict[str, dict[str, list[float]]]) -> dict[str, str]:
    """The kept rows, each replaced by this run's result once that has at least as many seeds."""
    rows = dict(kept)
    for name, scores in new.items():
        if name not in kept or len(scores["income"]) >= int(with_seeds(kept[name]).split("|")[-2]):
            rows[name] = row(name, scores)
    return rows


def with_seeds(line: str) -> str:
    """A kept row from a file written before the seeds column: its seed count from its ``± std`` (3 if present)."""
    if line.count("|") >= 6:
        return line
    return line + (" 3 |" if "±" in line else " 1 |")


if __name__ == "__main__":
    main()
