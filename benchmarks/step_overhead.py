"""Host work per training step: hand-written loops against ``Trainer`` + ``ParquetDataModule`` + the module.

    .venv/bin/python benchmarks/step_overhead.py                      # tiny and bench MMoE, about 2 minutes
    .venv/bin/python benchmarks/step_overhead.py --models tiny --rounds 5
    python3 benchmarks/step_overhead.py --accelerator gpu --precision bf16-mixed   # on a GPU machine

Two models: ``tiny`` (the benchmark's features with embedding dim 4, MMoE with 4
experts (16,) and towers (8,), batch 512: a step whose arithmetic is negligible, so
it measures the fixed cost of a step) and ``bench`` (the throughput benchmark's MMoE,
embedding dim 16, experts (256, 128), batch 2048). Every loop trains the same
architecture (same initial weights) on the same rows in the same order: a Parquet
file written to a temporary folder, read once into the data module's column store,
shuffled with the data module's permutation (seed 0, epoch 0). The loops:

* ``raw``: a hand-written loop a careful user writes: every step gathers its batch
  from the in-memory column store (``ColumnStore.batch``, the data module's gather),
  copies it to the device (``non_blocking``), runs the model, ``masked_loss`` per task,
  ``zero_grad(set_to_none=True)``, backward and ``torch.optim.Adam(fused=True)``.
  Every ratio is taken to this loop;
* ``raw-ceiling``: the fair ceiling, that loop with the optimisations the library
  uses and more: every batch gathered before the timed steps (on the device: no
  gather, copy or collation in a step), the per-task losses in one set of ops
  (``losses.fused.FusedTaskLosses``, as the module computes them), and on CUDA the
  whole step (forward, losses, backward, Adam with ``capturable=True``) captured once
  as a CUDA graph and replayed (``--no-cuda-graph`` leaves it eager; a capture that
  fails falls back to eager and says so);
* ``lightning-minimal``: a ``LightningModule`` whose ``training_step`` is the raw
  loop's forward and loss, under the same ``Trainer`` and ``ParquetDataModule`` as
  the next: Lightning's own cost;
* ``mtl-lightning``: ``Trainer`` (TensorBoard logger at Lightning's default
  ``log_every_n_steps=50``, no progress bar, checkpointing or summary) +
  ``ParquetDataModule`` + ``MultiTaskLightningModule`` at their defaults;
* ``mtl-lightning barebones``: the same under ``Trainer(barebones=True)`` (no logger);
* ``mtl-lightning host-batches``: ``ParquetDataModule(device_resident=False)``:
  batches built on the host and copied each step (the same as the default on a CPU).

Reported per model and loop: steps/s (wall clock over the timed steps) and rows/s, host ms per
step (``time.thread_time`` of the main thread, which other processes' load moves
much less than wall time; with one torch thread it holds all of a CPU step's
compute), their ratio to ``raw`` (per round, paired; the table gives the median and
the range), aten ops per step (``torch.profiler``, every ``aten::`` op, nested
ones included) and Python function calls per step (``cProfile``), both counted over
``--ops-steps`` steps of a separate, untimed run: counts, which no other process's
load moves. The loops take
turns in one process, ``--rounds`` times, the order reversed every other round.
On a GPU, ``--gpu-util`` samples ``nvidia-smi`` during the timed steps. Not a test:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import logging
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

LOOPS = ["raw", "raw-ceiling", "lightning-minimal", "mtl-lightning", "mtl-lightning barebones",
         "mtl-lightning host-batches"]
SHAPES = {  # model: (embedding dim, MMoE arguments, batch size, default timed steps)
    "tiny": (4, dict(num_experts=4, expert_hidden=(16,), tower_hidden=(8,)), 512, 200),
    "bench": (16, dict(num_experts=4, expert_hidden=(256, 128), tower_hidden=(64,)), 2048, 20),
}


@dataclasses.dataclass
class Setup:
    model: str
    features: list
    tasks: list
    path: Path
    batch_size: int
    warmup: int
    steps: int
    device: torch.device
    precision: str
    cuda_graph: bool
    store: Any = None

    def build(self) -> torch.nn.Module:
        from mtl_lightning import registry

        torch.manual_seed(0)
        return registry.create("mmoe", features=self.features, tasks=self.tasks, **SHAPES[self.model][1])

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + 1


def make_setup(model: str, args: argparse.Namespace, folder: Path) -> Setup:
    import pyarrow.parquet as pq

    import bench_data
    from throughput import features_and_tasks

    dim, _, batch_size, steps = SHAPES[model]
    batch_size = args.batch_size or batch_size
    steps = args.steps or steps
    features, tasks = features_and_tasks("mmoe")
    features = [dataclasses.replace(f, embedding_dim=dim) if hasattr(f, "embedding_dim") else f for f in features]
    setup = Setup(model, features, tasks, folder / f"{model}.parquet", batch_size, args.warmup, steps,
                  torch.device("cuda" if args.accelerator == "gpu" else "cpu"), args.precision,
                  not args.no_cuda_graph)
    # one epoch holds every step, so no loop crosses an epoch boundary
    pq.write_table(bench_data.make_table(batch_size * (setup.total_steps + args.ops_steps + 2), seed=0), setup.path)
    from datamodules.store import read_split

    setup.store = read_split([setup.path], features, tasks)
    return setup


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """The process's stderr (file descriptor 2) sent to /dev/null: the profiler's C++ side prints a line at every
    start and stop."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class Clock:
    """Forward pre-hook: main-thread CPU time and wall time at the start of every training forward; starts and
    stops a ``torch.profiler`` run over chosen steps when asked to count ops."""

    def __init__(self, setup: Setup, profile_steps: int = 0) -> None:
        self.cuda = setup.device.type == "cuda"
        self.warmup, self.steps = setup.warmup, setup.steps
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.profile_steps = profile_steps
        self.profiler: Any = None
        self.python: Any = None
        self.ops = self.calls = 0.0

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        if not module.training:
            return
        self.stamp()

    def stamp(self) -> None:
        step = len(self.cpu)
        if self.cuda and step in (self.warmup, self.warmup + self.steps):
            torch.cuda.synchronize()
        if self.profile_steps:
            if step == self.warmup:
                from torch.profiler import ProfilerActivity, profile

                self.profiler = profile(activities=[ProfilerActivity.CPU])
                with quiet_stderr():
                    self.profiler.__enter__()
                self.python = cProfile.Profile()
                self.python.enable()
            elif step == self.warmup + self.profile_steps and self.profiler is not None:
                self.python.disable()
                with quiet_stderr():
                    self.profiler.__exit__(None, None, None)
                events = self.profiler.events()
                self.ops = sum(e.name.startswith("aten::") for e in events) / self.profile_steps
                self.calls = pstats.Stats(self.python).total_calls / self.profile_steps  # type: ignore[attr-defined]
                self.profiler = None
        self.cpu.append(time.thread_time())
        self.wall.append(time.perf_counter())

    def result(self) -> dict[str, float]:
        first, last = self.warmup, self.warmup + self.steps
        if len(self.cpu) <= last:
            raise RuntimeError(f"only {len(self.cpu)} training steps ran; need {last + 1}")
        return {"steps_per_s": self.steps / (self.wall[last] - self.wall[first]),
                "host_ms": 1000 * (self.cpu[last] - self.cpu[first]) / self.steps,
                "window": (self.wall[first], self.wall[last])}


def run_raw(setup: Setup, clock: Clock, ceiling: bool) -> None:
    from mtl_lightning.losses import masked_loss

    device, tasks = setup.device, setup.tasks
    model = setup.build().to(device).train()
    if not ceiling:
        model.register_forward_pre_hook(clock)
    graph = ceiling and device.type == "cuda" and setup.cuda_graph
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, **({"capturable": True} if graph else {}))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.precision == "bf16-mixed",
                              cache_enabled=False if graph else None)  # a captured graph must not reuse cached casts
    order = torch.randperm(setup.store.num_rows, generator=torch.Generator().manual_seed(0))  # the data module's
    steps, size = setup.total_steps, setup.batch_size
    if not ceiling:
        for step in range(steps):
            batch = setup.store.batch(order[step * size:(step + 1) * size])
            features = {k: v.to(device, non_blocking=True) for k, v in batch["features"].items()}
            labels = {k: v.to(device, non_blocking=True) for k, v in batch["labels"].items()}
            with autocast:
                outputs = model(features)
            loss = sum(t.weight * masked_loss(outputs[t.name], labels[t.name], t.kind, -1) for t in tasks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return
    from datamodules.placement import resident_store
    from mtl_lightning.losses.fused import FusedTaskLosses

    store = resident_store(setup.store, device)
    index = order.to(device)
    batches = [store.batch(index[step * size:(step + 1) * size]) for step in range(steps)]
    fused = FusedTaskLosses(tasks)
    weights = torch.tensor([float(t.weight) for t in tasks], device=device)

    def step(batch: dict) -> None:
        with autocast:
            outputs = model(batch["features"])
        loss = (weights * fused(outputs, batch["labels"])[0]).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    replay = capture(step, batches[0], device) if graph else None
    for batch in batches:
        clock.stamp()
        if replay is not None:
            replay(batch)
        else:
            step(batch)


def capture(step: Callable[[dict], None], example: dict, device: torch.device) -> Callable[[dict], None] | None:
    """The whole step captured as a CUDA graph: ``replay(batch)`` copies the batch into the captured inputs and
    replays. ``None`` (and a note) when the capture fails: the loop then runs eagerly."""
    static = {section: {k: v.clone() for k, v in value.items()} if isinstance(value, dict) else value.clone()
              for section, value in example.items()}
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs asks
                step(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(static)
    except Exception as err:  # noqa: BLE001  (any capture failure means: run eagerly)
        print(f"  raw-ceiling: CUDA graph capture failed ({type(err).__name__}: {err}); eager instead")
        return None

    def replay(batch: dict) -> None:
        for section in ("features", "labels"):
            for k, v in batch[section].items():
                static[section][k].copy_(v, non_blocking=True)
        graph.replay()

    return replay


def run_lightning(setup: Setup, clock: Clock, loop: str) -> None:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from datamodules import ParquetDataModule
    from mtl_lightning import MultiTaskLightningModule
    from mtl_lightning.losses import masked_loss

    model = setup.build()
    model.register_forward_pre_hook(clock)
    tasks = setup.tasks
    if loop == "lightning-minimal":
        class Minimal(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
                outputs = self.model(batch["features"])
                return sum(t.weight * masked_loss(outputs[t.name], batch["labels"][t.name], t.kind, -1) for t in tasks)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)

        module: L.LightningModule = Minimal()
    else:
        module = MultiTaskLightningModule(model, lr=1e-3)
    host = {"device_resident": False, "pin_memory": setup.device.type == "cuda"} if loop.endswith("host-batches") else {}
    data = ParquetDataModule(train=str(setup.path), tasks=tasks, features=setup.features, batch_size=setup.batch_size,
                             progress=False, **host)
    quiet: dict[str, Any] = (dict(barebones=True) if loop.endswith("barebones") else dict(
        logger=TensorBoardLogger(tempfile.mkdtemp(prefix="step-overhead-")), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False))
    trainer = L.Trainer(accelerator="gpu" if setup.device.type == "cuda" else "cpu", devices=1,
                        precision=setup.precision, max_steps=setup.total_steps, max_epochs=1,
                        num_sanity_val_steps=0, limit_val_batches=0, **quiet)
    trainer.fit(module, data)


def run(setup: Setup, loop: str, profile_steps: int = 0) -> dict[str, float]:
    clock = Clock(setup, profile_steps)
    if loop.startswith("raw"):
        run_raw(setup, clock, ceiling=loop == "raw-ceiling")
    else:
        run_lightning(setup, clock, loop)
    return clock.result() if not profile_steps else {"ops": clock.ops, "calls": clock.calls}


class GpuUtilisation:
    """``nvidia-smi`` sampled every 100 ms in a thread; ``mean(start, end)`` over a wall-clock window."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100", "-i", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            try:
                self.samples.append((time.perf_counter(), float(line)))
            except ValueError:
                pass

    def mean(self, window: tuple[float, float]) -> float | None:
        inside = [u for t, u in self.samples if window[0] <= t <= window[1]]
        return statistics.mean(inside) if inside else None

    def stop(self) -> None:
        self.process.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,bench", help="comma-separated: tiny, bench")
    parser.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated, from {LOOPS}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 200 tiny, 20 bench)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default 512 (tiny) or 2048 (bench)")
    parser.add_argument("--ops-steps", type=int, default=3, help="steps the profiler counts ops over (0: no count)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--no-cuda-graph", action="store_true", help="raw-ceiling stays eager on CUDA")
    parser.add_argument("--gpu-util", action="store_true", help="sample nvidia-smi during the timed steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  (its loggers exist from here on)

    import datamodules  # noqa: F401
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "datamodules")):
            logging.getLogger(name).setLevel(logging.ERROR)
    loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    unknown = sorted(set(loops) - set(LOOPS))
    if unknown or "raw" not in loops:
        parser.error(f"--loops must include raw and come from {LOOPS}; unknown: {unknown}")
    sampler = GpuUtilisation() if args.gpu_util else None
    started = time.perf_counter()
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else f"CPU, {args.threads} torch thread(s)"
    print(f"step_overhead: {device}, precision {args.precision}, {args.rounds} rounds; torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="step-overhead-") as folder:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            setup = make_setup(model, args, Path(folder))
            results: dict[str, list[dict[str, float]]] = {loop: [] for loop in loops}
            for round_ in range(args.rounds):
                for loop in loops if round_ % 2 == 0 else loops[::-1]:
                    result = run(setup, loop)
                    if sampler is not None:
                        result["gpu_util"] = sampler.mean(result["window"])  # type: ignore[arg-type]
                    results[loop].append(result)
            ops = {loop: run(setup, loop, args.ops_steps) if args.ops_steps else None for loop in loops}
            report(setup, results, ops, sampler is not None)
    if sampler is not None:
        sampler.stop()
    print(f"total {time.perf_counter() - started:.0f} s")


def counted(count: dict[str, float] | None, key: str) -> str:
    return "-" if count is None else f"{count[key]:,.0f}"


def report(setup: Setup, results: dict[str, list[dict[str, float]]], ops: dict[str, dict[str, float] | None],
           gpu: bool) -> None:
    raw = results["raw"]
    print(f"\n{setup.model} MMoE, batch {setup.batch_size}, {setup.steps} timed steps after {setup.warmup} per run; "
          "medians over rounds (min-max); ratios paired per round, to raw")
    head = "| loop | steps/s | rows/s | ratio to raw | host ms/step | raw/this host ms | aten ops/step | Python calls/step |"
    print(head + (" GPU util % |" if gpu else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else ""))
    for loop, runs in results.items():
        speed = [r["steps_per_s"] for r in runs]
        host = [r["host_ms"] for r in runs]
        speed_ratio = [r["steps_per_s"] / b["steps_per_s"] for r, b in zip(runs, raw)]
        host_ratio = [b["host_ms"] / r["host_ms"] for r, b in zip(runs, raw)]
        count = ops[loop]
        row = (f"| {loop} | {statistics.median(speed):,.1f} ({min(speed):,.1f}-{max(speed):,.1f}) "
               f"| {statistics.median(speed) * setup.batch_size:,.0f} "
               f"| {statistics.median(speed_ratio):.3f} ({min(speed_ratio):.2f}-{max(speed_ratio):.2f}) "
               f"| {statistics.median(host):.2f} ({min(host):.2f}-{max(host):.2f}) "
               f"| {statistics.median(host_ratio):.3f} ({min(host_ratio):.2f}-{max(host_ratio):.2f}) "
               f"| {counted(count, 'ops')} | {counted(count, 'calls')} |")
        if gpu:
            utils = [r["gpu_util"] for r in runs if r.get("gpu_util") is not None]
            row += f" {statistics.median(utils):.0f} |" if utils else " - |"
        print(row)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
