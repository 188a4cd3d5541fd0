# The two commands of the README:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint docs bench clean browser-deps requirements

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# requirements*.txt are generated from pyproject.toml (dependencies, extras, [tool.cbir.pins]).
requirements:
	$(PY) tools/requirements.py

# Chromium + chromedriver for the browser test (Debian packages; needs root, skipped if apt is absent).
browser-deps:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	 { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	   echo "browser-deps: chromium not installed (the browser test will be skipped)"; }

demo: setup
	$(BIN)/cbir evaluate --dataset demo

test: setup browser-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# Architecture checks: no import cycle inside cbir, no library module importing the CLI.
lint: setup
	$(BIN)/python -m pytest -q -n 0 tests/test_architecture.py

# The API reference of `import cbir` from the docstrings (pdoc) into build/api/ (git-ignored); fails on a
# name of cbir.__all__ that does not import or is undocumented, or a cross-reference that does not resolve.
# `make test` runs the same build and checks in tests/test_api_docs.py.
docs: setup
	$(BIN)/python docs/api/build_reference.py --out build/api

# Speed benchmarks at sizes that finish in minutes on 2 cores; each prints a ratio against a
# baseline measured in the same run. The README gives the larger runs and their commands.
bench: setup
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/rerank.py --sizes 5000,100000
	$(BIN)/python benchmarks/search.py --n 100000 --dim 512
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf $(VENV) build *.egg-info
