# Two commands: `make run` (the whole pipeline on the embedded synthetic default) and
# `make test` (lint + the whole suite). Both create .venv from requirements.txt if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/synthetic
CONFIG ?= experiments/synthetic/config.py

.PHONY: run test lint venv clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

run: venv
	$(PY) run.py --config=$(CONFIG) --workdir=$(WORKDIR) --mode=all

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
