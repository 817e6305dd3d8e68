# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test

setup:
	@VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(PY) demo.py

test: setup
	$(PY) -m pytest
