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
# TORCH_INDEX=cpu installs torch/torchvision from the PyTorch CPU wheel index (~200 MB instead of the CUDA
# build's GBs) before the rest; unset (the default) leaves torch to pip's normal index.
TORCH_INDEX ?=
TORCH_INDEX_URL := $(if $(TORCH_INDEX),https://download.pytorch.org/whl/$(TORCH_INDEX))
DEMO_DATA ?= demo/roads
DEMO_OUT ?= demo-out
TK := $(BIN)/transferkit

.PHONY: install test test-fast demo ui bench lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(if $(TORCH_INDEX_URL),$(BIN)/pip install -q torch torchvision --index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The edit-test loop: everything but the tests marked slow (end-to-end training, servers, wheels, torchrun);
# under 2 minutes on 2 cores. `make test` (CI) still runs them all.
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# The main job end to end on the bundled demo data: check, finetune (tracked in ./mlflow.db), evaluate,
# predict, then frozen features + SVM. `make ui` afterwards shows the runs.
demo: install
	rm -rf $(DEMO_OUT)
	$(TK) data check $(DEMO_DATA)
	$(TK) finetune --recipe quick-cpu --data $(DEMO_DATA) --out $(DEMO_OUT)/runs --name demo
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
