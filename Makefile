# Every target that needs the environment depends on `install`, so on a fresh machine
# `make fit` and `make test` are all a user types.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format fit ablate bench tensorboard wheelhouse gpu-check clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

# The suite on TEST_WORKERS pytest-xdist workers, one torch thread each (tests/conftest.py);
# each test module runs whole on one worker, so its shared fixtures (a trained run, the SLURM
# cluster) are built once (--dist loadscope), longest modules first (conftest.py's measured
# seconds; --no-loadscope-reorder keeps that order). Three workers on two cores: many tests
# wait on subprocesses, signals and SLURM, so a third keeps the cores busy (2 workers: 705 s,
# 3: 661 s on the 2-core machine, 2026-12-06).
TEST_WORKERS ?= 3
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

fit: install
	$(BIN)/python -m swin_lightning fit --config configs/demo.yaml

# Shift vs no shift on the embedded window-border task, 3 seeds each; re-running skips
# finished runs. Report: logs/shift/report.md, report.csv, val_acc1.png.
ablate: install
	$(BIN)/python -m swin_lightning ablate --config configs/ablations/window_pairs.yaml configs/ablations/specs/shift.yaml

# Speed against timm, torchvision and a plain loop; writes docs/benchmarks.md (~6 min, 2 cores).
bench: install
	$(BIN)/python -m swin_lightning bench --out docs/benchmarks.md

# Wheels for a GPU node without network (Python 3.12, manylinux x86-64): what a bare GPU image
# lacks to run the GPU check (scripts/gpu_wheels.txt), into .whl/. Needs the package index.
WHEEL_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(p)_x86_64)
wheelhouse:
	rm -rf .whl.tmp
	$(PYTHON) -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp $(WHEEL_PLATFORMS) \
		-d .whl.tmp -r scripts/gpu_wheels.txt
	rm -rf .whl && mv .whl.tmp .whl
	@ls .whl

# On a GPU machine (no network needed; carries .whl/ if it is there): tests, bench, a fit.
gpu-check:
	bash scripts/gpu_check.sh gpu_report

tensorboard: install
	$(BIN)/tensorboard --logdir logs --host 127.0.0.1

clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info .whl.tmp
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
