# Two commands a newcomer needs: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export MPLBACKEND := Agg
SHARED ?= ../shared
# Offline weights for the demo when the hub is out of reach; an exported TRANSFERKIT_WEIGHTS_DIR wins.
export TRANSFERKIT_WEIGHTS_DIR ?= $(if $(wildcard $(SHARED)/weights/*.safetensors),$(abspath $(SHARED)/weights))
DEMO_DATA ?= demo/roads
DEMO_OUT ?= demo-out
TK := $(BIN)/transferkit

.PHONY: install test demo ui bench lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The main job end to end on the bundled demo data: check, finetune (tracked in ./mlflow.db), evaluate,
# predict, then frozen features + SVM. `make ui` afterwards shows the runs.
demo: install
	rm -rf $(DEMO_OUT)
	$(TK) data check $(DEMO_DATA)
	$(TK) finetune --recipe recipes/quick-cpu.yaml --data $(DEMO_DATA) --out $(DEMO_OUT)/runs --name demo
	$(TK) evaluate --model $(DEMO_OUT)/runs/demo --data $(DEMO_DATA) --split val --out $(DEMO_OUT)/eval
	$(TK) predict --model $(DEMO_OUT)/runs/demo $(DEMO_DATA)/val --out $(DEMO_OUT)/predictions.csv
	$(TK) svm --backbone tf_efficientnet_lite0 --data $(DEMO_DATA) --model logistic --out $(DEMO_OUT)/svm
	@echo "demo done: $(DEMO_OUT)/ holds the run, evaluation, predictions and SVM model; 'make ui' opens the dashboard"

lint: install
	$(BIN)/ruff check transferkit tests bench

ui: install
	$(BIN)/transferkit ui

bench: install
	set -e; for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script; done

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .pytest_cache $(DEMO_OUT)
