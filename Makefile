# secretfs: `make demo` (set up + a tour of the embedded store), `make test`, `make bench`.
# Every target installs what a fresh Debian/Ubuntu machine lacks, so a clean clone needs nothing else.

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps demo test lint bench clean

setup: system-deps $(STAMP)

# Debian packages pyfuse3 needs to build and run, and the PostgreSQL server and client
# (/usr/lib/postgresql/<ver>/bin) plus strace that the rotation tests against a real server use,
# installed only when missing. The tests run their own throw-away cluster, never Debian's `main`.
system-deps:
	@missing=""; \
	command -v fusermount3 >/dev/null 2>&1 || missing="$$missing fuse3"; \
	command -v pkg-config  >/dev/null 2>&1 || missing="$$missing pkg-config"; \
	pkg-config --exists fuse3 2>/dev/null  || missing="$$missing libfuse3-dev"; \
	command -v cc          >/dev/null 2>&1 || missing="$$missing gcc"; \
	command -v getfattr    >/dev/null 2>&1 || missing="$$missing attr"; \
	ls /usr/lib/postgresql/*/bin/initdb /usr/lib/postgresql/*/bin/psql >/dev/null 2>&1 \
	                                       || missing="$$missing postgresql"; \
	command -v strace      >/dev/null 2>&1 || missing="$$missing strace"; \
	$(PYTHON) -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
	                                       || missing="$$missing python3-dev"; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

demo: setup
	@PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

lint: setup
	$(BIN)/ruff check secretfs injector tests benchmarks

test: lint
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python benchmarks/cli.py
	$(BIN)/python benchmarks/read.py
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/rotation.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/backends.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .hypothesis .ruff_cache *.egg-info
