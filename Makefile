# Cosnap backend. `make up` runs the suite, `make test` tests it; both install
# what they need (virtual environment, Python packages, buf from npm) first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
PROTOS := $(shell find protos -name '*.proto')
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: up test bench gen lint fmt check-gen migrate clean system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check '.[dev,local]'
	$(PY) -c 'import site, pathlib; r = pathlib.Path.cwd(); pathlib.Path(site.getsitepackages()[0], "cosnap.pth").write_text(f"{r}\n{r}/build/gen\n")'
	touch $@

$(BUF): package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

build/.generated: $(PROTOS) buf.yaml tools/codegen.py $(VENV)/.installed $(BUF)
	$(PY) tools/codegen.py
	touch $@

gen: build/.generated

up: build/.generated
	$(PY) tools/up.py

test: lint system-deps
	$(PY) -m pytest -q

# Debian packages some tests use: promtool (package prometheus: alert rule unit tests and
# PromQL checks) and chromium (the docs page). Installed only when missing, as root with
# apt-get; elsewhere it says what is missing and those tests skip with a reason.
system-deps:
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get -o DPkg::Lock::Timeout=600 update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
	      --no-install-recommends $$missing; \
	  else echo "make: missing Debian packages:$$missing (the tests that need them skip)"; fi; \
	fi

bench: build/.generated
	$(PY) -m bench

lint: build/.generated
	$(BUF) lint
	$(BUF) format -d --exit-code
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(VENV)/.installed $(BUF)
	$(BUF) format -w
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build $(VENV) node_modules
