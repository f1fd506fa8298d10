"""Side-by-side training throughput: mtl-lightning against a raw PyTorch loop and the anchor libraries.

    .venv/bin/python benchmarks/throughput.py                 # (make bench) the default run
    .venv/bin/python benchmarks/throughput.py --quick         # a small, fast run
    make bench-anchors                                        # + nextrec and torch-rechub (own virtualenv)
    python3 benchmarks/throughput.py --accelerator gpu --precision bf16-mixed

The dataset (``bench_data.py``: 16 sparse features with vocabularies from 10 to
100,000, 8 dense, one 20-long sequence, click/conversion/dwell labels; 1M
training rows by default) is written once under ``benchmarks/.cache/``.

Behaviour sequences read by attention: the models ``mmoe-din`` and ``mmoe-mean`` (in the default
``--models``) are the same MMoE on ``datamodules.synthetic_sequences`` data with histories of up to
``--history-len`` (50) clicks, ``--sequence-rows`` training rows: ``hist_item`` and ``hist_category`` (sharing
the candidate's tables) form one group encoded by DIN with the candidate (``item_id``, ``category``) as the
query, or are mean-pooled. Each runs ``raw`` and ``mtl-lightning`` only; the report adds the per-step cost of
DIN over mean pooling, each repetition's ``mmoe-din`` step against the ``mmoe-mean`` step of the same
repetition.

    .venv/bin/python benchmarks/throughput.py --models mmoe-mean,mmoe-din --no-auc --no-datapath

Every measurement runs in a fresh child process (so peak RSS is its own) and
the systems take turns inside each repetition, so that load from other
processes on a shared machine hits all of them alike; the table reports the
median over repetitions and every ratio is taken to the raw loop's median of
the same run. Rows/s is timed identically for every system: a forward
pre-hook on the model stamps each training step, the first ``--warmup`` steps
are left out, then ``--steps`` steps are timed (data loading, forward,
backward, optimizer and logging all inside). Systems:

* ``raw``: a minimal hand-written loop over column tensors already in memory
  (random batches by ``index_select``), the same architecture object, the same
  masked losses, with the settings a careful user picks: ``torch.optim.Adam``
  with PyTorch's fused kernel (``fused=True``, CPU since PyTorch 2.4, and CUDA;
  the default implementation where it is not available) and
  ``zero_grad(set_to_none=True)``. Every ratio is taken to this loop;
* ``raw-default-adam``: the same loop with ``torch.optim.Adam`` at its defaults
  (not fused): the baseline of earlier tables, kept for continuity;
* ``raw-sparse``: that loop with sparse embedding gradients and ``SparseAdam``
  for the tables (fused Adam for the rest);
* ``raw-frozen`` (MMoE): that loop with the embedding tables frozen (no table
  gradient, no table update; fused Adam for the rest): not a way to train, but
  the ceiling any sparse or fused embedding update can approach;
* ``raw-frozen-grad`` (MMoE): ``raw-frozen`` whose looked-up vectors still
  get their gradient (the output of the embedding layer requires grad, so the
  backward pass computes the gradient of the loss with respect to the
  embedding outputs, through the first layer, but no table gradient and no
  update): the backward work that training the tables by any method needs, the
  tighter ceiling for a fused or sparse table update;
* ``mtl-lightning``: ``lightning.Trainer`` + ``ParquetDataModule`` +
  ``MultiTaskLightningModule`` (TensorBoard logger at its defaults; progress
  bar, checkpointing and validation off);
* ``mtl-lightning sparse``: the same with ``sparse_embeddings=True``;
* ``mtl-lightning torchrec`` (MMoE, where TorchRec is installed): the same under
  ``TorchRecStrategy(sharding="table_wise", embedding_optimizer="rowwise_adagrad")``
  in one process: fbgemm's fused table-batched kernels update the tables inside
  the backward pass (``--embedding-lr``), the dense part on the same Adam. Its
  goal is the ``raw-frozen`` ceiling;
* ``mtl-lightning compile`` (``--compile``): ``compile_model=True``;
* ``nextrec``, ``torch-rechub`` (MMoE only): their own MMoE through their
  normal training API, in the ``--anchors-python`` virtualenv (``make bench-anchors``).

Also measured: the data path alone (Parquet files to shuffled batches, no
model, one torch thread; in memory: the first epoch with the read, and a later
epoch; streaming: an epoch read from the files) and, with ``--auc`` (default), validation click AUC after one
epoch of dense and of sparse MMoE training on ``--auc-rows`` rows (the sparse
option's quality check).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import bench_data  # noqa: E402

PROJECT_SYSTEMS = ["raw", "raw-default-adam", "raw-sparse", "mtl-lightning", "mtl-lightning sparse"]
#: models on the behaviour-sequence data: {name: the history's pooling}; they run SEQUENCE_SYSTEMS only
SEQUENCE_MODELS = {"mmoe-mean": "mean", "mmoe-din": "din"}
SEQUENCE_SYSTEMS = ["raw", "mtl-lightning"]
MMOE_SYSTEMS = ["raw-frozen", "raw-frozen-grad", "mtl-lightning torchrec"]  # measured for MMoE only
ANCHOR_SYSTEMS = ["torch-rechub", "nextrec"]


# ---------------------------------------------------------------------- children
def sequence_data(rows: int, history_len: int) -> dict[str, Path]:
    """``{"train", "val"}`` of the behaviour-sequence data (``datamodules.synthetic_sequences``), cached."""
    from datamodules.synthetic_sequences import write_sequence_synthetic

    folder = HERE / ".cache" / f"sequences-{rows}-history-{history_len}"
    paths = {"train": folder / "train.parquet", "val": folder / "val.parquet"}
    if not all(p.exists() for p in paths.values()):
        written = write_sequence_synthetic(folder / "tmp", (rows, bench_data.val_rows(rows), 1), max_history=history_len)
        for split, path in paths.items():
            written[split].rename(path)
        written["test"].unlink()
        (folder / "tmp").rmdir()
    return paths


def features_and_tasks(model: str, history_len: int = 50) -> tuple[list, list]:
    from mtl_lightning import Task
    from mtl_lightning.features import DenseFeature, SequenceFeature, SparseFeature

    if model in SEQUENCE_MODELS:
        import dataclasses

        from datamodules.synthetic_sequences import sequence_features, sequence_tasks

        pooling, query = SEQUENCE_MODELS[model], {"hist_item": "item_id", "hist_category": "category"}
        features = sequence_features(bench_data.EMBEDDING_DIM, history_len)
        if pooling != "mean":
            features = [dataclasses.replace(f, pooling=pooling, query=query[f.name], group="hist")
                        if f.name in query else f for f in features]
        return features, sequence_tasks()

    features = (
        [SparseFeature(n, v, bench_data.EMBEDDING_DIM) for n, v in zip(bench_data.SPARSE, bench_data.SPARSE_VOCABS)]
        + [DenseFeature(n) for n in bench_data.DENSE]
        + [SequenceFeature(bench_data.SEQUENCE, bench_data.SEQ_VOCAB, bench_data.SEQ_LEN, bench_data.EMBEDDING_DIM)]
    )
    if model == "esmm":
        tasks = [Task("ctr", label="click"), Task("ctcvr", label="purchase")]
    else:
        tasks = [Task("click"), Task("conversion"), Task("dwell", kind="regression")]
    return features, tasks


def build_model(model: str, features: list, tasks: list):
    from mtl_lightning import registry

    shapes: dict[str, dict[str, Any]] = {
        "mmoe": dict(num_experts=4, expert_hidden=(256, 128), tower_hidden=(64,)),
        "ple": dict(num_levels=2, num_specific_experts=1, num_shared_experts=2, expert_hidden=(256, 128),
                    tower_hidden=(64,)),
        "esmm": dict(tower_hidden=(256, 128, 64)),
    }
    architecture = "mmoe" if model in SEQUENCE_MODELS else model
    return registry.create(architecture, features=features, tasks=tasks, **shapes[architecture])


class StepClock:
    """Forward pre-hook: stamps the start of each training forward (syncing CUDA only at the two ends).

    At the two ends of the timed steps it also reads the process's CPU time and minor page faults: on a
    shared machine CPU time per step moves much less with other processes' load than wall time does.
    """

    def __init__(self, warmup: int, steps: int, cuda: bool) -> None:
        self.warmup, self.steps, self.cuda = warmup, steps, cuda
        self.stamps: list[float] = []
        self.usage: list[tuple[float, int]] = []

    def __call__(self, module, args) -> None:
        if not module.training:
            return
        if self.cuda and len(self.stamps) in (self.warmup, self.warmup + self.steps):
            import torch

            torch.cuda.synchronize()
        if len(self.stamps) in (self.warmup, self.warmup + self.steps):
            usage = resource.getrusage(resource.RUSAGE_SELF)
            self.usage.append((usage.ru_utime + usage.ru_stime, usage.ru_minflt))
        self.stamps.append(time.perf_counter())

    def seconds(self) -> float:
        if len(self.stamps) <= self.warmup + self.steps:
            raise RuntimeError(f"only {len(self.stamps)} training steps ran; need {self.warmup + self.steps + 1}")
        return self.stamps[self.warmup + self.steps] - self.stamps[self.warmup]

    def result(self, batch_size: int) -> dict[str, Any]:
        """rows/s, and CPU milliseconds and minor page faults per timed step."""
        seconds = self.seconds()
        (cpu0, faults0), (cpu1, faults1) = self.usage
        return {"rows_per_s": self.steps * batch_size / seconds, "cpu_ms_per_step": 1000 * (cpu1 - cpu0) / self.steps,
                "wall_ms_per_step": 1000 * seconds / self.steps, "minor_faults_per_step": (faults1 - faults0) / self.steps}


class GpuSampler:
    """Samples GPU utilisation with ``nvidia-smi`` every 100 ms; ``mean(start, end)`` averages a time window."""

    def __init__(self) -> None:
        import shutil
        import threading

        self.samples: list[tuple[float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi") is None:
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100", "-i", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            try:
                self.samples.append((time.perf_counter(), float(line.strip())))
            except ValueError:
                pass

    def mean(self, start: float, end: float) -> float | None:
        if self.proc is not None:
            self.proc.terminate()
        inside = [u for t, u in self.samples if start <= t <= end]
        return statistics.mean(inside) if inside else None


def add_gpu_utilisation(result: dict[str, Any], sampler: GpuSampler | None, clock: StepClock) -> None:
    if sampler is not None:
        util = sampler.mean(clock.stamps[clock.warmup], clock.stamps[clock.warmup + clock.steps])
        if util is not None:
            result["gpu_util_pct"] = util


def adam(params: list, fused: bool = True):
    """``torch.optim.Adam(lr=1e-3)``: with the fused kernel where this PyTorch and device have it (a careful
    user's choice), else (or with ``fused=False``) at its defaults."""
    import torch

    if fused:
        try:
            return torch.optim.Adam(params, lr=1e-3, fused=True)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.Adam(params, lr=1e-3)


def run_raw(args: argparse.Namespace, sparse: bool, frozen: bool = False, fused: bool = True,
            embedding_grad: bool = False) -> dict[str, Any]:
    import torch

    from datamodules.store import read_split
    from mtl_lightning.layers.embedding import FeatureEmbedding
    from mtl_lightning.losses import masked_loss

    features, tasks = features_and_tasks(args.model, args.history_len)
    store = read_split([Path(args.train)], features, tasks)
    model = build_model(args.model, features, tasks)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    model.to(device).train()
    tables = [p for m in model.modules() if isinstance(m, FeatureEmbedding) for p in m.embedding_parameters()]
    if sparse:
        for m in model.modules():
            if isinstance(m, FeatureEmbedding):
                m.sparse = True
        ids = {id(p) for p in tables}
        optimizers = [torch.optim.SparseAdam(tables, lr=1e-3),
                      adam([p for p in model.parameters() if id(p) not in ids], fused)]
    elif frozen:  # the ceiling of any embedding-update scheme: no table gradient and no table update at all
        for table in tables:
            table.requires_grad_(False)
        if embedding_grad:  # the backward still reaches the looked-up vectors (the embedding layer's output)
            for m in model.modules():
                if isinstance(m, FeatureEmbedding):
                    m.register_forward_hook(lambda module, inputs, output: output.requires_grad_())
        optimizers = [adam([p for p in model.parameters() if p.requires_grad], fused)]
    else:
        optimizers = [adam(list(model.parameters()), fused)]
    clock = StepClock(args.warmup, args.steps, device.type == "cuda")
    model.register_forward_pre_hook(clock)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    sampler = GpuSampler() if device.type == "cuda" else None
    order = torch.randperm(store.num_rows)
    for step in range(args.warmup + args.steps + 1):
        lo = (step * args.batch_size) % (store.num_rows - args.batch_size + 1)
        batch = store.batch(order[lo : lo + args.batch_size])
        x = {k: v.to(device, non_blocking=True) for k, v in batch["features"].items()}
        y = {k: v.to(device, non_blocking=True) for k, v in batch["labels"].items()}
        with autocast:
            out = model(x)
        loss = sum(t.weight * masked_loss(out[t.name], y[t.name], t.kind, -1) for t in tasks)
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in optimizers:
            o.step()
    result = clock.result(args.batch_size)
    add_gpu_utilisation(result, sampler, clock)
    return result


def run_lightning(args: argparse.Namespace, sparse: bool, compile_model: bool = False,
                  barebones: bool = False, torchrec: bool = False) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from datamodules import ParquetDataModule
    from mtl_lightning import MultiTaskLightningModule

    features, tasks = features_and_tasks(args.model, args.history_len)
    gpu = args.accelerator == "gpu"
    dm = ParquetDataModule(train=args.train, val=args.val if args.auc else None, tasks=tasks, features=features,
                           batch_size=args.batch_size, pin_memory=gpu)
    model = build_model(args.model, features, tasks)
    kwargs: dict[str, Any] = {"sparse_embeddings": sparse}
    if sparse and args.sparse_lr:
        kwargs["sparse_lr"] = args.sparse_lr
    if compile_model:
        kwargs["compile_model"] = True
    module = MultiTaskLightningModule(model, lr=1e-3, **kwargs)
    clock = StepClock(args.warmup, args.steps, gpu)
    model.register_forward_pre_hook(clock)
    logdir = tempfile.mkdtemp(prefix="bench-logs-")
    try:  # TensorBoard, Lightning's default logger, where it is installed
        logger = TensorBoardLogger(logdir)
    except ModuleNotFoundError:
        logger = CSVLogger(logdir)
    sampler = GpuSampler() if gpu else None
    # barebones: Lightning's own speed mode (no logger, callbacks, progress bar or summary), for its overhead
    quiet: dict[str, Any] = (dict(barebones=True) if barebones else dict(
        logger=logger, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False))
    if torchrec:
        from mtl_lightning.distributed import TorchRecStrategy

        quiet["strategy"] = TorchRecStrategy(sharding="table_wise", embedding_optimizer="rowwise_adagrad",
                                             embedding_lr=args.embedding_lr)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, precision=args.precision,
        max_steps=-1 if args.auc else args.warmup + args.steps + 1, max_epochs=1,
        num_sanity_val_steps=0, limit_val_batches=1.0 if args.auc else 0, **quiet,
    )
    trainer.fit(module, dm)
    result: dict[str, Any] = clock.result(args.batch_size)
    add_gpu_utilisation(result, sampler, clock)
    if args.auc:
        result["val_click_auc"] = float(trainer.callback_metrics["val/click/auc"])
    return result


def run_datapath(args: argparse.Namespace) -> dict[str, Any]:
    """Parquet to shuffled batches, no model, one torch thread: in memory (read once, then every epoch from the
    store) and streaming (every epoch read from the files), two epochs each."""
    import torch

    from datamodules import ParquetDataModule

    torch.set_num_threads(1)
    features, tasks = features_and_tasks("mmoe")

    def epoch(dataset, number: int) -> tuple[int, float]:
        dataset.set_epoch(number)
        start = time.perf_counter()
        rows = sum(len(batch["row_id"]) for batch in dataset)
        return rows, time.perf_counter() - start

    start = time.perf_counter()
    dm = ParquetDataModule(train=args.train, tasks=tasks, features=features, batch_size=args.batch_size)
    dm.setup("fit")
    read = time.perf_counter() - start
    dataset = dm.dataset("train")
    rows, first = epoch(dataset, 0)
    _, second = epoch(dataset, 1)
    del dm, dataset
    stream = ParquetDataModule(train=args.train, tasks=tasks, features=features, batch_size=args.batch_size,
                               streaming=True)
    stream.setup("fit")
    streamed = stream.dataset("train")
    _, stream_first = epoch(streamed, 0)
    _, stream_second = epoch(streamed, 1)
    return {"rows_per_s": rows / (read + first), "read_rows_per_s": rows / read, "batch_rows_per_s": rows / second,
            "stream_rows_per_s": rows / stream_second, "stream_first_rows_per_s": rows / stream_first}

# What each child measures: a function of the child's arguments returning at least ``{"rows_per_s": ...}``
# (timed with ``StepClock``). Adding a system is one entry here plus its name in ``PROJECT_SYSTEMS`` (every
# model) or ``MMOE_SYSTEMS`` (MMoE only); a system in neither runs when ``--systems`` names it.
CHILD_SYSTEMS: dict[str, Any] = {
    "raw": lambda args: run_raw(args, sparse=False),
    "raw-default-adam": lambda args: run_raw(args, sparse=False, fused=False),
    "raw-sparse": lambda args: run_raw(args, sparse=True),
    "raw-frozen": lambda args: run_raw(args, sparse=False, frozen=True),
    "raw-frozen-grad": lambda args: run_raw(args, sparse=False, frozen=True, embedding_grad=True),
    "mtl-lightning": lambda args: run_lightning(args, sparse=False),
    "mtl-lightning sparse": lambda args: run_lightning(args, sparse=True),
    "mtl-lightning compile": lambda args: run_lightning(args, sparse=False, compile_model=True),
    "mtl-lightning barebones": lambda args: run_lightning(args, sparse=False, barebones=True),
    "mtl-lightning torchrec": lambda args: run_lightning(args, sparse=False, torchrec=True),
    "data path": run_datapath,
}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    # Lightning's DDP launcher (under TorchRecStrategy) sets torch's threads to the machine's CPU count unless
    # OMP_NUM_THREADS is set: every system gets --threads
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.manual_seed(0)
    if args.child not in CHILD_SYSTEMS:
        raise SystemExit(f"unknown system {args.child!r}; known: {', '.join(CHILD_SYSTEMS)}")
    result = CHILD_SYSTEMS[args.child](args)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------ parent
def cpu_ticks() -> tuple[int, int] | None:
    """``(total, busy)`` CPU ticks of the whole machine since boot (``/proc/stat``; ``None`` where there is none)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(values), sum(values) - values[3] - values[4]  # idle and iowait are not busy


def cpu_idle_percent(seconds: float = 3.0) -> float | None:
    """How idle the machine's CPUs were over ``seconds``."""
    before = cpu_ticks()
    time.sleep(seconds)
    after = cpu_ticks()
    if before is None or after is None:
        return None
    return 100.0 * (1 - (after[1] - before[1]) / max(after[0] - before[0], 1))


def wait_until_idle(percent: float, patience: float) -> float | None:
    """Wait (at most ``patience`` seconds) until the CPUs are at least ``percent`` idle; the idle % last seen."""
    deadline = time.perf_counter() + patience
    while True:
        idle = cpu_idle_percent()
        if idle is None or idle >= percent or time.perf_counter() >= deadline:
            return idle
        time.sleep(2.0)


WAIT_IDLE: tuple[float, float] = (0.0, 0.0)  # (--wait-idle, --wait-patience), set by main
CLEAN: tuple[float, int] = (0.0, 0)  # (--clean, --clean-retries), set by main


def launch(command: list[str], label: str, timeout: float) -> dict[str, Any] | None:
    """Run one child; with ``--clean`` run it again (at most ``--clean-retries`` times) while other processes
    used more than that share of the machine's CPUs during its run, and keep the cleanest attempt."""
    best: dict[str, Any] | None = None
    for attempt in range(1 + CLEAN[1] if CLEAN[0] > 0 else 1):
        result = launch_once(command, label, timeout)
        if result is None:
            return best
        result["attempts"] = attempt + 1
        if best is None or result.get("foreign_cpu_pct", 0.0) < best.get("foreign_cpu_pct", 0.0):
            best = result
        if CLEAN[0] <= 0 or best.get("foreign_cpu_pct", 0.0) <= CLEAN[0]:
            break
    return best


def launch_once(command: list[str], label: str, timeout: float) -> dict[str, Any] | None:
    idle = wait_until_idle(*WAIT_IDLE) if WAIT_IDLE[0] > 0 else None
    started = time.perf_counter()
    ticks0, children0 = cpu_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    except subprocess.TimeoutExpired:
        print(f"  {label}: timed out after {timeout:.0f} s", flush=True)
        return None
    ticks1, children1 = cpu_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            if idle is not None:
                result["idle_before_pct"] = idle
            if ticks0 is not None and ticks1 is not None:
                # the share of the machine's CPU time that other processes used while the child ran (its
                # whole life, start-up included): 0 on an idle machine; a 2-thread step slows down many
                # times over as soon as another process competes for the cores
                hz = os.sysconf("SC_CLK_TCK")
                own = (children1.ru_utime + children1.ru_stime - children0.ru_utime - children0.ru_stime) * hz
                result["foreign_cpu_pct"] = max(0.0, 100.0 * (ticks1[1] - ticks0[1] - own) / max(ticks1[0] - ticks0[0], 1))
            print(f"  {label}: {result['rows_per_s']:,.0f} rows/s"
                  + (f" ({result['cpu_ms_per_step']:.1f} ms CPU per step)" if "cpu_ms_per_step" in result else "")
                  + f", peak RSS {result['peak_rss_mib']:,.0f} MiB"
                  + (f", val click AUC {result['val_click_auc']:.4f}" if "val_click_auc" in result else "")
                  + (f", GPU utilisation {result['gpu_util_pct']:.0f} %" if "gpu_util_pct" in result else "")
                  + (f", CPUs {idle:.0f} % idle before" if idle is not None else "")
                  + (f", other processes {result['foreign_cpu_pct']:.0f} % of the CPUs during it"
                     if "foreign_cpu_pct" in result else "")
                  + f" ({time.perf_counter() - started:.0f} s)", flush=True)
            return result
    tail = "\n    ".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    print(f"  {label}: failed (exit {proc.returncode}):\n    {tail}", flush=True)
    return None


def child_command(args: argparse.Namespace, system: str, model: str, **overrides: Any) -> list[str]:
    options = {"--model": model, "--train": args.train, "--val": args.val, "--batch-size": args.batch_size,
               "--warmup": args.warmup, "--steps": args.steps, "--threads": args.threads,
               "--accelerator": args.accelerator, "--precision": args.precision, "--history-len": args.history_len}
    if model in SEQUENCE_MODELS:
        options["--train"], options["--val"] = args.sequence_paths["train"], args.sequence_paths["val"]
    if args.sparse_lr:
        options["--sparse-lr"] = args.sparse_lr
    if system == "mtl-lightning torchrec":
        options["--embedding-lr"] = args.embedding_lr
    auc = bool(overrides.pop("--auc", False))
    options.update(overrides)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", system]
    for key, value in options.items():
        command += [key, str(value)]
    return command + (["--auc"] if auc else ["--no-auc"])


def anchor_command(args: argparse.Namespace, system: str) -> list[str]:
    return [args.anchors_python, str(HERE / "anchors.py"), system, "--train", str(args.train),
            "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--threads", str(args.threads), "--device", "cuda" if args.accelerator == "gpu" else "cpu"]


def anchors_available(python: str | None) -> list[str]:
    if not python:
        return []
    if not Path(python).exists():
        print(f"anchors: {python} does not exist; run `make bench-anchors` to install nextrec and torch-rechub")
        return []
    found = []
    for system, module in (("torch-rechub", "torch_rechub"), ("nextrec", "nextrec")):
        ok = subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0
        (found.append(system) if ok else print(f"anchors: {module} is not importable with {python}; skipped"))
    return found


def registered() -> list[str]:
    from mtl_lightning import registry

    return list(registry.names())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows of the cached dataset")
    parser.add_argument("--quick", action="store_true", help="100k rows, 20 timed steps, 2 repetitions, no AUC")
    parser.add_argument("--models", default="mmoe,ple,esmm,mmoe-mean,mmoe-din",
                        help="comma-separated; esmm only when registered; mmoe-mean and mmoe-din: MMoE on the "
                             "behaviour-sequence data, the history mean-pooled or read by DIN")
    parser.add_argument("--history-len", type=int, default=50, help="history length of mmoe-mean / mmoe-din")
    parser.add_argument("--sequence-rows", type=int, default=100_000,
                        help="training rows of the behaviour-sequence data (mmoe-mean / mmoe-din)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--precision", default="32-true", help="a Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--anchors-python", default=None,
                        help="python of the virtualenv with nextrec and torch-rechub (make bench-anchors)")
    parser.add_argument("--auc", action=argparse.BooleanOptionalAction, default=True,
                        help="also train MMoE dense and sparse for one epoch (--auc-rows) and compare val click AUC")
    parser.add_argument("--datapath", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the data path alone, once per repetition")
    parser.add_argument("--auc-rows", type=int, default=200_000, help="training rows of the AUC check's dataset")
    parser.add_argument("--sparse-lr", type=float, default=None, help="sparse_lr of the sparse systems")
    parser.add_argument("--embedding-lr", type=float, default=0.05,
                        help="embedding_lr of the torchrec system (row-wise Adagrad)")
    parser.add_argument("--auc-sparse-lr", type=float, default=0.005,
                        help="the AUC check also trains sparse with this sparse_lr (0: skip)")
    parser.add_argument("--systems", default=None,
                        help="comma-separated subset to run (raw always runs), e.g. 'mtl-lightning compile'")
    parser.add_argument("--compile", action="store_true", help="also measure compile_model=True")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="PERCENT",
                        help="on a shared machine: before each child, wait until the CPUs are this %% idle over 3 s "
                             "(at most --wait-patience seconds, then run anyway); 0: do not wait")
    parser.add_argument("--wait-patience", type=float, default=300.0, help="seconds --wait-idle waits at most")
    parser.add_argument("--clean", type=float, default=0.0, metavar="PERCENT",
                        help="on a shared machine: run a child again when other processes used more than this %% "
                             "of the CPUs during its run (at most --clean-retries times; the cleanest attempt is "
                             "kept); 0: never")
    parser.add_argument("--clean-retries", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    # used by the child processes
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mmoe", help=argparse.SUPPRESS)
    parser.add_argument("--train", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--val", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    global WAIT_IDLE, CLEAN
    WAIT_IDLE, CLEAN = (args.wait_idle, args.wait_patience), (args.clean, args.clean_retries)
    if args.quick:
        args.rows, args.steps, args.repeats, args.auc = min(args.rows, 100_000), min(args.steps, 20), 2, False
    started = time.perf_counter()
    paths = bench_data.dataset(args.rows)
    args.train, args.val = str(paths["train"]), str(paths["val"])
    models = [m for m in args.models.split(",") if m]
    if any(m in SEQUENCE_MODELS for m in models):
        needed = (args.warmup + args.steps + 1) * args.batch_size  # the library trains one epoch of them
        if args.sequence_rows < needed:
            raise SystemExit(f"--sequence-rows {args.sequence_rows} is less than the {needed} rows of "
                             f"{args.warmup} + {args.steps} + 1 steps of batch {args.batch_size}")
        args.sequence_paths = {k: str(v) for k, v in sequence_data(args.sequence_rows, args.history_len).items()}
    known = registered() + [m for m in SEQUENCE_MODELS if "mmoe" in registered()]
    for m in [m for m in models if m not in known]:
        print(f"{m}: not registered in this checkout; skipped")
    models = [m for m in models if m in known]
    anchors = anchors_available(args.anchors_python)
    systems = {m: (SEQUENCE_SYSTEMS if m in SEQUENCE_MODELS else PROJECT_SYSTEMS)
               + (["mtl-lightning compile"] if args.compile else []) for m in models}
    if "mmoe" in systems:
        mmoe_systems = MMOE_SYSTEMS
        from mtl_lightning.distributed._torchrec import torchrec_available

        if not torchrec_available():
            print("mtl-lightning torchrec: TorchRec is not installed in this environment; skipped")
            mmoe_systems = [s for s in MMOE_SYSTEMS if s != "mtl-lightning torchrec"]
        systems["mmoe"] = systems["mmoe"] + mmoe_systems + anchors
    if args.systems:
        wanted = ["raw"] + [x.strip() for x in args.systems.split(",") if x.strip() and x.strip() != "raw"]
        unknown = [x for x in wanted if x not in CHILD_SYSTEMS and x not in ANCHOR_SYSTEMS]
        if unknown:
            raise SystemExit(f"--systems: unknown {unknown}; known: {', '.join(list(CHILD_SYSTEMS) + ANCHOR_SYSTEMS)}")
        extra = [x for x in wanted if x in CHILD_SYSTEMS and x != "data path"]  # opt-in systems, e.g. barebones
        systems = {m: [x for x in found if x in wanted] + [x for x in extra if x not in found]
                   for m, found in systems.items()}
    print(f"dataset: {args.rows:,} training rows ({paths['train']}); batch {args.batch_size}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} repetitions, {args.threads} threads, "
          f"{args.accelerator} {args.precision}", flush=True)
    if any(m in SEQUENCE_MODELS for m in models):
        print(f"behaviour-sequence data ({', '.join(m for m in models if m in SEQUENCE_MODELS)}): "
              f"{args.sequence_rows:,} training rows, histories of up to {args.history_len}", flush=True)

    results: dict[str, dict[str, list[dict[str, Any]]]] = {m: {s: [] for s in systems[m]} for m in models}
    datapath: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        print(f"repetition {rep + 1}/{args.repeats}", flush=True)
        for m in models:
            # the systems take turns, in reverse order every other repetition, so that neither drift in the
            # machine's load nor a position in the sequence favours one of them
            for s in (systems[m] if rep % 2 == 0 else systems[m][::-1]):
                command = anchor_command(args, s) if s in ANCHOR_SYSTEMS else child_command(args, s, m)
                r = launch(command, f"{m} {s}", args.timeout)
                if r is not None:
                    r["repetition"] = rep
                    results[m][s].append(r)
        r = launch(child_command(args, "data path", "mmoe"), "data path", args.timeout) if args.datapath else None
        if r is not None:
            datapath.append(r)

    auc: dict[str, dict[str, Any]] = {}
    if args.auc and "mmoe" in models:
        auc_paths = bench_data.dataset(args.auc_rows)
        print(f"quality: one epoch of MMoE on {args.auc_rows:,} rows, validation click AUC on "
              f"{bench_data.val_rows(args.auc_rows):,}", flush=True)
        runs = [("mtl-lightning", "mtl-lightning", {}), ("mtl-lightning sparse", "mtl-lightning sparse", {})]
        if "mtl-lightning torchrec" in systems.get("mmoe", []):
            runs.append((f"mtl-lightning torchrec, embedding_lr={args.embedding_lr:g}", "mtl-lightning torchrec", {}))
        if args.auc_sparse_lr:
            runs.append((f"mtl-lightning sparse, sparse_lr={args.auc_sparse_lr:g}", "mtl-lightning sparse",
                         {"--sparse-lr": args.auc_sparse_lr}))
        for label, s, extra in runs:
            overrides = {"--auc": True, "--train": auc_paths["train"], "--val": auc_paths["val"], **extra}
            r = launch(child_command(args, s, "mmoe", **overrides), f"mmoe {label} (1 epoch)", args.timeout * 2)
            if r is not None:
                auc[label] = r

    print_report(args, results, datapath, auc, time.perf_counter() - started)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "datapath": datapath, "auc": auc,
                                         "args": {k: v for k, v in vars(args).items() if k != "json"}}, indent=1,
                                        default=str))


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def paired_ratios(runs: list[dict[str, Any]], raw_runs: list[dict[str, Any]]) -> list[float]:
    """rows/s of each repetition over the raw loop's rows/s of the same repetition."""
    raw = {r.get("repetition"): r["rows_per_s"] for r in raw_runs}
    return [r["rows_per_s"] / raw[r.get("repetition")] for r in runs if r.get("repetition") in raw]


def print_sequence_cost(results) -> None:
    """The per-step cost of DIN over mean pooling: ``mmoe-din`` against ``mmoe-mean``, paired by repetition, in wall
    and in CPU milliseconds per step (CPU time moves less with other processes' load)."""
    din, mean = results.get("mmoe-din", {}), results.get("mmoe-mean", {})
    lines = []
    for system in SEQUENCE_SYSTEMS:
        for key, unit in (("wall_ms_per_step", "wall"), ("cpu_ms_per_step", "CPU")):
            base = {r["repetition"]: r[key] for r in mean.get(system, [])}
            pairs = [(r[key], base[r["repetition"]]) for r in din.get(system, []) if r["repetition"] in base]
            if not pairs:
                continue
            extra = sorted(d - m for d, m in pairs)
            ratios = sorted(d / m for d, m in pairs)
            lines.append(f"| {system} | {unit} | {statistics.median(m for _, m in pairs):.1f} | "
                         f"{statistics.median(d for d, _ in pairs):.1f} | {statistics.median(extra):+.1f} "
                         f"({extra[0]:+.1f} to {extra[-1]:+.1f}) | {statistics.median(ratios):.2f}x |")
    if lines:
        print("\nDIN over mean pooling (MMoE on the behaviour-sequence data), ms per training step, medians over "
              "repetitions (range of the per-repetition differences):\n")
        print("| system | ms | mean pooling ms/step | DIN ms/step | DIN - mean ms/step | DIN / mean |")
        print("|---|---|---:|---:|---:|---:|")
        print("\n".join(lines))


def print_report(args, results, datapath, auc, seconds: float) -> None:
    print(f"\nMedians over {args.repeats} repetitions ({args.accelerator}, {args.precision}, {args.threads} threads, "
          f"batch {args.batch_size}; total {seconds / 60:.1f} min). 'ratio to raw' divides the medians; "
          "'per repetition' gives the range of each repetition's ratio to the raw loop run beside it; CPU ms is "
          "the process's CPU time per training step (all threads); 'others' is the median share of the CPUs that "
          "other processes used while a measurement ran (0 on an idle machine)\n")
    gpu = any("gpu_util_pct" in r for by_system in results.values() for runs in by_system.values() for r in runs)
    print("| model | system | train rows/s | ratio to raw | per repetition | CPU ms/step | others | peak RSS MiB |"
          " RSS ratio to raw |" + (" GPU util % |" if gpu else ""))
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else ""))
    for m, by_system in results.items():
        raw_runs = by_system.get("raw", [])
        raw_speed, raw_rss = median(raw_runs, "rows_per_s"), median(raw_runs, "peak_rss_mib")
        for s, runs in by_system.items():
            if not runs and args.repeats == 0:
                continue
            speed, rss = median(runs, "rows_per_s"), median(runs, "peak_rss_mib")
            if speed is None:
                print(f"| {m} | {s} | failed | | | | | | |")
                continue
            spread = f" ({min(r['rows_per_s'] for r in runs):,.0f}–{max(r['rows_per_s'] for r in runs):,.0f})"
            ratio = f"{speed / raw_speed:.2f}" if raw_speed else ""
            paired = paired_ratios(runs, raw_runs) if s != "raw" else []
            per_rep = f"{min(paired):.2f}–{max(paired):.2f}" if len(paired) > 1 else ""
            cpu, others = median(runs, "cpu_ms_per_step"), median(runs, "foreign_cpu_pct")
            rss_ratio = f"{rss / raw_rss:.2f}" if raw_rss else ""
            util = median(runs, "gpu_util_pct")
            print(f"| {m} | {s} | {speed:,.0f}{spread if len(runs) > 1 else ''} | {ratio} | {per_rep} | "
                  f"{f'{cpu:.1f}' if cpu is not None else ''} | {f'{others:.0f} %' if others is not None else ''} | "
                  f"{rss:,.0f} | {rss_ratio} |"
                  + ((f" {util:.0f} |" if util is not None else " |") if gpu else ""))
    print_sequence_cost(results)
    if datapath:
        print(f"\nData path alone (Parquet -> shuffled batches of {args.batch_size}, no model, 1 torch thread, "
              f"{args.rows:,} rows), rows/s:\n"
              f"- in memory, first epoch including the read: {median(datapath, 'rows_per_s'):,.0f} "
              f"(the read and checks alone: {median(datapath, 'read_rows_per_s'):,.0f})\n"
              f"- in memory, every later epoch: {median(datapath, 'batch_rows_per_s'):,.0f}\n"
              f"- streaming, every epoch read from the files: {median(datapath, 'stream_rows_per_s'):,.0f} "
              f"(first epoch {median(datapath, 'stream_first_rows_per_s'):,.0f})")
    if auc:
        parts = [f"{s}: {r['val_click_auc']:.4f}" for s, r in auc.items()]
        print(f"\nValidation click AUC after one epoch of MMoE on {args.auc_rows:,} rows: " + ", ".join(parts))


if __name__ == "__main__":
    main()
