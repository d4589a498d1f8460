# Every target that needs the environment depends on `install`, so on a fresh machine
# `make fit` and `make test` are all a user types.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format fit ablate bench tensorboard clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

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

tensorboard: install
	$(BIN)/tensorboard --logdir logs --host 127.0.0.1

clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
