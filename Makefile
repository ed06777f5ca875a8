# Two commands a newcomer needs: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export MPLBACKEND := Agg
SHARED ?= ../shared
DEMO_WEIGHTS ?= $(SHARED)/weights

.PHONY: install test demo ui bench lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check transferkit tests bench

ui: install
	$(BIN)/transferkit ui

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .pytest_cache
