# Every target sets itself up: a local virtualenv in .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CPU build of torch where no NVIDIA GPU is present; the default build otherwise.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.2" || echo "torch==2.13.0")
# TorchRec (mtl_lightning.distributed.TorchRecStrategy) and its fbgemm kernels, the release built for the installed
# torch: FBGEMM and TorchRec 1.N are built for torch 2.(N+5) (FBGEMM's compatibility table: 1.5 for 2.10, 1.8 for
# 2.13). The CPU build of fbgemm without an NVIDIA GPU, the CUDA one with. Installed with --no-deps: torchrec's own
# requirements pull the CUDA fbgemm (several hundred MB, sharing the fbgemm_gpu folder with the CPU build) and pin
# torchmetrics==1.0.3; the pure-Python packages it imports come from pyproject's `torchrec` extra.
FBGEMM_PACKAGE := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "fbgemm-gpu" || echo "fbgemm-gpu-cpu")
TORCHREC_RELEASE := import torch; major, minor = map(int, torch.__version__.split('.')[:2]); \
	print(f'1.{minor - 5}.0' if major == 2 and minor >= 5 else '')

.PHONY: setup demo test docs lint bench bench-anchors quality census clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,torchrec]"
	release=$$($(PY) -c "$(TORCHREC_RELEASE)"); if [ -n "$$release" ]; then \
		$(PY) -m pip install -q --no-deps "$(FBGEMM_PACKAGE)==$$release" "torchrec==$$release" || \
		echo "TorchRec $$release not installed: TorchRecStrategy will be unavailable (docs: distributed training)"; \
	else echo "TorchRec not installed: no release matches this torch (docs: distributed training)"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# `make test`: the suite in 2 pytest-xdist workers (one torch thread each, tests/conftest.py), each test file on
# one worker (--dist loadfile: module fixtures such as test_torchrec.py's 2-rank run happen once). One area:
# `.venv/bin/python -m pytest -q tests/<area>` (docs/contributing.md, "Tests").
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# `make docs`: the MkDocs site (mkdocs.yml) into site/, strict: a broken link, anchor, snippet or API reference
# fails the build. `.venv/bin/mkdocs serve` serves it while you edit.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# `make lint`: ruff with the configuration in pyproject.toml ([tool.ruff]).
lint: $(STAMP)
	$(PY) -m ruff check .

# `make bench`: the side-by-side throughput benchmark (benchmarks/throughput.py --help for options;
# BENCH_ARGS="--quick" for a small run). It includes nextrec and torch-rechub when `make bench-anchors`
# has installed them into .venv-anchors, a separate virtualenv: they are never dependencies of the library.
BENCH_ARGS ?=
ANCHORS := .venv-anchors
ANCHORS_STAMP := $(ANCHORS)/.installed

bench: $(STAMP)
	$(PY) benchmarks/throughput.py $(BENCH_ARGS)

$(ANCHORS_STAMP):
	test -x $(ANCHORS)/bin/python || $(PYTHON) -m venv $(ANCHORS)
	$(ANCHORS)/bin/pip install -q --upgrade pip
	$(ANCHORS)/bin/python -c "import torch" 2>/dev/null || $(ANCHORS)/bin/pip install -q "$(TORCH_SPEC)"
	# nextrec lists torchvision but never imports it
	$(ANCHORS)/bin/pip install -q --no-deps nextrec==0.6.14
	$(ANCHORS)/bin/pip install -q "numpy>=1.21,<2.0" "pandas>=1.5,<2.0" "polars>=0.20.0" "pyarrow>=10.0.0,<13.0.0" \
		"pyyaml>=6.0" "rich>=13.7.0" "scikit-learn>=1.2,<2.0" "scipy>=1.8,<1.12" "transformers>=4.38.0"
	printf 'numpy<2.0\npandas<2.0\npyarrow<13.0.0\nscipy<1.12\n' > $(ANCHORS)/constraints.txt
	$(ANCHORS)/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >> $(ANCHORS)/constraints.txt
	$(ANCHORS)/bin/pip install -q -c $(ANCHORS)/constraints.txt torch-rechub==0.9.0
	touch $(ANCHORS_STAMP)

# `make quality`: every architecture and weighting strategy on Census-Income, 3 seeds
# (QUALITY_ARGS="--quick" for one seed and 3 epochs; "--jobs N --threads 1" to run N trainings at once).
# The data: `make census` (UCI's file, checksum-checked, into CENSUS_DIR); without it quality says what to run.
CENSUS_DIR ?= $(or $(MTL_CENSUS_DIR),data/census)

quality: $(STAMP)
	MTL_CENSUS_DIR=$(CENSUS_DIR) $(PY) benchmarks/quality.py $(QUALITY_ARGS)

census: $(STAMP)
	$(PY) -m datamodules.census download $(CENSUS_DIR)

# `make bench-anchors`: install the anchor libraries into .venv-anchors, then run the benchmark with them.
bench-anchors: $(STAMP) $(ANCHORS_STAMP)
	$(PY) benchmarks/throughput.py --anchors-python $(ANCHORS)/bin/python $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(ANCHORS) data runs lightning_logs benchmarks/.cache site
