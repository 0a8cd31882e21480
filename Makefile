# Cosnap backend. `make up` runs the suite, `make test` tests it; both install
# what they need (virtual environment, Python packages, buf from npm) first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
PROTOS := $(shell find protos -name '*.proto')
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: up test bench gen lint fmt check-gen migrate clean

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

test: lint
	$(PY) -m pytest -q

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
