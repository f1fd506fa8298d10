"""Every code block of README.md and docs/ runs, so the documentation cannot drift from the code.

The convention (docs/docs-conventions.md):

* ``python`` blocks of one page run in order in one namespace, which starts with what the README's Python
  quickstart defines (``L``, ``ParquetDataModule``, ``MultiTaskLightningModule``, ``Task``, ``registry``,
  ``tasks``, ``dm``, ``model``, ``module``, ``trainer``, ``restored``): a page reads as a continuation of it.
  ``lightning.Trainer`` is replaced by a subclass with tiny overrides (one epoch of at most 2 batches per
  split, no progress bar) so that a block that trains costs a second, not minutes.
* ``bash`` blocks run with ``bash -euo pipefail``; ``mtl-lightning`` is served in this process (no
  interpreter start per command) with the same tiny Trainer overrides appended to its arguments.
* Both run in one workspace directory per test module that holds what ``make demo`` leaves
  (``data/synthetic/{train,val,test}.parquet``, fewer rows), the repository's ``configs/``, a
  ``.venv/bin/activate`` to source, and ``logs/{train,val}/`` (raw categorical columns) for the raw-log
  examples.
* A block that cannot run here (GPUs, an object store, the whole test suite, an error message rather than
  code) is preceded by ``<!-- docs-test: skip reason="..." -->``; the reason is required, and any other
  language needs the marker too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import lightning
import lightning.pytorch
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datamodules.synthetic import make_table, write_synthetic

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNABLE = {"python", "bash"}
MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<body>.*?)-->", re.S)
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
TINY_TRAINER = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=2, limit_test_batches=2,
                    limit_predict_batches=2, num_sanity_val_steps=0, enable_progress_bar=False,
                    enable_model_summary=False)
TINY_CLI = [f"--trainer.{key}={str(value).lower()}" for key, value in TINY_TRAINER.items()]


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    skip: str | None  # the reason, when marked not runnable

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.lang or 'no language'})"


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` with the marker that precedes each (only blank lines in between)."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        marker = None
        comments = list(MARKER.finditer(before))
        if comments and before.endswith("-->") and comments[-1].end() == len(before):
            marker = comments[-1].group("body").strip()
        skip = None
        if marker is not None:
            parsed = re.fullmatch(r'skip\s+reason="(?P<reason>[^"]*)"', marker)
            if parsed is None:
                raise AssertionError(f"{page.name}: unknown docs-test marker {marker!r} (only skip reason=\"...\")")
            skip = parsed.group("reason").strip()
        line = text[: match.start()].count("\n") + 1
        code = "\n".join(row[len(match.group("indent")):] for row in match.group("code").split("\n"))
        found.append(Block(page, line, match.group("lang"), code, skip))
    return found


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks_of(page)]


# ---------------------------------------------------------------- the convention itself


def test_every_block_is_runnable_or_marked_with_a_reason():
    problems = []
    for block in all_blocks():
        if block.skip is not None and not block.skip:
            problems.append(f"{block}: skip marker without a reason")
        if block.skip is None and block.lang not in RUNNABLE:
            problems.append(f"{block}: a '{block.lang}' block is not run; mark it <!-- docs-test: skip reason=... -->")
    assert not problems, "\n".join(problems)
    quickstarts = [b.lang for b in blocks_of(ROOT / "README.md") if b.skip is None]
    assert quickstarts == ["python", "bash"], "the README's two quickstarts always run"


def test_marker_parser_reads_reasons_and_rejects_unknown_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('text\n\n<!-- docs-test: skip reason="needs 4 GPUs" -->\n```python\nx = 1\n```\n\n'
                    "```bash\necho hi\n```\n\n<!-- an ordinary comment -->\n```text\nout\n```\n")
    first, second, third = blocks_of(page)
    assert (first.lang, first.skip, first.code) == ("python", "needs 4 GPUs", "x = 1\n")
    assert (second.lang, second.skip) == ("bash", None)
    assert (third.lang, third.skip) == ("text", None)
    page.write_text("<!-- docs-test: run -->\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="unknown docs-test marker"):
        blocks_of(page)


def test_readme_tables_list_every_registered_architecture_and_weighting_strategy():
    from mtl_lightning import registry
    from mtl_lightning.weighting import STRATEGIES

    readme = (ROOT / "README.md").read_text()

    def table_names(heading: str) -> set[str]:
        section = readme[readme.index(heading):]
        section = section[: section.index("\n## ", 1)]
        return set(re.findall(r"^\| `(\w+)`", section, re.M))

    hint = "add one row per registered name (docs/docs-conventions.md: where things go)"
    assert table_names("## Architectures") == set(registry.names()), f"README architectures: {hint}"
    assert table_names("## Loss weighting") == set(STRATEGIES), f"README weighting strategies: {hint}"
    docs_weighting = (ROOT / "docs" / "weighting.md").read_text()
    assert set(re.findall(r"^\| `(\w+)`", docs_weighting, re.M)) == set(STRATEGIES), f"docs/weighting.md: {hint}"
    docs_architectures = (ROOT / "docs" / "architectures.md").read_text()
    assert set(re.findall(r"^\| `(\w+)`", docs_architectures, re.M)) >= set(registry.names()), (
        f"docs/architectures.md: {hint}")


# ---------------------------------------------------------------- running the blocks


class TinyTrainer(lightning.Trainer):
    """``lightning.Trainer`` with the tiny overrides: the documented arguments, one epoch of 2 batches."""

    def __init__(self, *args, **kwargs):
        kwargs.update(TINY_TRAINER)
        super().__init__(*args, **kwargs)


def write_raw_logs(directory: Path) -> None:
    """``logs/{train,val}/``: the synthetic rows with raw categorical columns (strings), for the raw-log examples."""
    for split, seed in (("train", 0), ("val", 1)):
        table = make_table(600, seed=seed)
        rng = np.random.default_rng(seed)
        n = table.num_rows
        extra = {
            "device_id": pa.array([f"device-{i}" for i in rng.integers(0, 400, n)]),
            "campaign": pa.array([f"campaign-{i}" for i in rng.integers(0, 30, n)]),
            "request_id": pa.array(np.arange(n, dtype=np.int64) + seed * n),
        }
        city = pa.array([f"city-{c}" for c in table.column("city").to_numpy()])
        table = table.set_column(table.schema.get_field_index("city"), "city", city)
        for name, column in extra.items():
            table = table.append_column(name, column)
        (directory / split).mkdir(parents=True)
        pq.write_table(table, directory / split / "part-0.parquet")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("docs")
    write_synthetic(ws / "data" / "synthetic", (2_000, 500, 500))  # `make demo`'s files, fewer rows
    write_raw_logs(ws / "logs")
    (ws / "configs").symlink_to(ROOT / "configs")
    (ws / ".venv" / "bin").mkdir(parents=True)
    (ws / ".venv" / "bin" / "python").symlink_to(sys.executable)  # `python` and `.venv/bin/python`: this interpreter
    (ws / ".venv" / "bin" / "activate").write_text(
        '# docs test: mtl-lightning is served by tests/docs/test_docs.py\nexport PATH="$PWD/.venv/bin:$PATH"\n')
    return ws


@contextlib.contextmanager
def inside(directory: Path):
    previous = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def tiny_trainer():
    saved = lightning.Trainer, lightning.pytorch.Trainer
    lightning.Trainer = lightning.pytorch.Trainer = TinyTrainer
    try:
        yield
    finally:
        lightning.Trainer, lightning.pytorch.Trainer = saved


def run_python(block: Block, namespace: dict) -> None:
    with tiny_trainer():
        exec(compile(block.code, f"{block}", "exec"), namespace)


def serve_cli(args: list[str]) -> int:
    """One ``mtl-lightning`` command, in this process; its exit status."""
    from mtl_lightning.cli import main

    try:
        asks_help = any(a in {"-h", "--help"} or a.endswith(".help") for a in args)
        runs = args and args[0] in {"fit", "validate", "test", "predict"} and not asks_help
        main([*args, *TINY_CLI] if runs else args)
    except SystemExit as stop:  # --help, or an argument error
        if stop.code not in (0, None):
            print(f"docs test: mtl-lightning {shlex.join(args)} exited with {stop.code!r}", file=sys.stderr)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except Exception:  # noqa: BLE001 - reported to the block's script as a failed command
        traceback.print_exc()
        return 1
    return 0


def run_bash(block: Block, directory: Path, timeout: float = 300) -> list[list[str]]:
    """Runs a bash block whose ``mtl-lightning`` commands are served by ``serve_cli``; the commands it ran.

    The shell function ``mtl-lightning`` writes its arguments to a request file (renamed into place, so it
    appears whole) and waits for the exit status in a response file, which this process writes the same way.
    """
    request, response = directory / ".docs-test-request", directory / ".docs-test-response"
    for path in (request, response):
        path.unlink(missing_ok=True)
    req, resp = shlex.quote(str(request)), shlex.quote(str(response))
    shim = (f"mtl-lightning() {{ printf '%s\\0' \"$@\" > {req}.tmp; mv {req}.tmp {req}; "
            f"while [ ! -e {resp} ]; do sleep 0.02; done; local rc; rc=$(cat {resp}); rm -f {resp}; "
            f"return \"$rc\"; }}\n")
    log = directory / ".docs-test-output"
    env = {**os.environ, "PATH": f"{directory / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", shim + block.code], cwd=directory, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    commands, deadline = [], time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{block}: still running after {timeout} s:\n{log.read_text()}")
        if not request.exists():
            time.sleep(0.02)
            continue
        args = request.read_bytes().decode().split("\0")[:-1]
        request.unlink()
        commands.append(args)
        rc = serve_cli(args)
        staged = response.with_suffix(".tmp")
        staged.write_text(f"{rc}\n")
        staged.rename(response)
    assert proc.returncode == 0, f"{block} failed (exit {proc.returncode}) after {commands}:\n{log.read_text()}"
    return commands


@pytest.fixture(scope="module")
def quickstart(workspace):
    """The namespace the README's Python quickstart leaves; every page's Python blocks start from it."""
    block = next(b for b in blocks_of(ROOT / "README.md") if b.lang == "python")
    namespace: dict = {}
    with inside(workspace):
        run_python(block, namespace)
    return namespace


PAGES_WITH_CODE = [p for p in PAGES if any(b.skip is None and b.lang in RUNNABLE for b in blocks_of(p))]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_CODE])
def test_page_code_blocks_run(page, workspace, quickstart):
    runnable = [b for b in blocks_of(page) if b.skip is None and b.lang in RUNNABLE]
    namespace = dict(quickstart)
    with inside(workspace):
        for block in runnable:
            if page.name == "README.md" and block.lang == "python":
                continue  # the quickstart fixture ran it
            if block.lang == "python":
                run_python(block, namespace)
            else:
                commands = run_bash(block, workspace)
                if "mtl-lightning" in block.code:
                    assert commands, f"{block}: its mtl-lightning commands never ran"


def test_bash_harness_reports_a_failing_command(workspace):
    """The bash runner fails on a failing mtl-lightning command (so a drifted flag cannot pass)."""
    block = Block(ROOT / "README.md", 0, "bash", "mtl-lightning fit --config configs/mmoe.yaml --no-such-flag\n", None)
    with inside(workspace), pytest.raises(AssertionError, match="failed"):
        run_bash(block, workspace)
    ok = Block(ROOT / "README.md", 0, "bash", "mtl-lightning fit --help > /dev/null\necho done\n", None)
    with inside(workspace):
        assert run_bash(ok, workspace) == [["fit", "--help"]]
