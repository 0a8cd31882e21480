# Cosnap backend. `make up` runs the suite, `make test` tests it; both install
# what they need (virtual environment, the locked Python packages, buf from npm) first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
PROTOS := $(shell find protos -name '*.proto')
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: up test bench gen lint fmt lock token clean system-deps

# Exactly the versions and hashes of requirements.lock (`make lock` regenerates it
# from pyproject.toml); `make lint` fails while the lock disagrees with pyproject.toml.
$(VENV)/.installed: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
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
	$(PY) tools/check_lock.py
	$(VENV)/bin/mypy

# A signed token for any user and role: `make token SUB=alice ROLE=user [TTL=seconds]`
# (with AUTH_JWT_SECRET, or the development secret `make up` uses).
token: $(VENV)/.installed
	@$(PY) tools/mint_token.py --sub "$(SUB)" --role "$(or $(ROLE),user)" $(if $(TTL),--ttl $(TTL))

# After adding or changing a dependency in pyproject.toml (always an exact `==` pin).
lock: $(VENV)/.installed
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra local --universal \
		--python-version 3.11 --generate-hashes --custom-compile-command 'make lock' \
		--quiet -o requirements.lock
	$(VENV)/bin/pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
	touch $(VENV)/.installed

fmt: $(VENV)/.installed $(BUF)
	$(BUF) format -w
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build $(VENV) node_modules
