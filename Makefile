# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up first.
# `make mutation` runs mutation testing (not part of `make test`; hours at one thread): all modules of
# scripts/mutation.toml, or some: make mutation MODULES="ldm/schedule.py ldm/guidance.py".
# `make ui` serves the web UI on http://127.0.0.1:7860 (flags: make ui UI_FLAGS='--port 8000 --share').
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

UI_FLAGS ?=
MODULES ?=

.PHONY: setup demo test ui mutation

setup:
	@VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(PY) demo.py

test: setup
	$(PY) -m pytest

ui: setup
	$(PY) -m ldm.app $(UI_FLAGS)

mutation: setup
	OMP_NUM_THREADS=1 $(PY) scripts/mutation.py $(MODULES)
