# secretfs: `make demo` (set up + a tour of the embedded store), `make test`, `make bench`,
# `sudo make install` (a system-wide install with the systemd units: docs/systemd.md).
# Every target installs what a fresh Debian/Ubuntu machine lacks, so a clean clone needs nothing else.

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup build-deps system-deps demo test lint fuzz bench clean install uninstall

setup: system-deps $(STAMP)

# Installs the Debian packages named in $$missing (a shell variable), if any.
define apt_install_missing
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

# What pyfuse3 needs to build and run, and what a virtualenv needs: enough for `make install`.
build-deps:
	@missing=""; \
	command -v fusermount3 >/dev/null 2>&1 || missing="$$missing fuse3"; \
	command -v pkg-config  >/dev/null 2>&1 || missing="$$missing pkg-config"; \
	pkg-config --exists fuse3 2>/dev/null  || missing="$$missing libfuse3-dev"; \
	command -v cc          >/dev/null 2>&1 || missing="$$missing gcc"; \
	$(PYTHON) -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
	                                       || missing="$$missing python3-dev"; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	$(apt_install_missing)

# Also what the tests use: getfattr, the PostgreSQL server and client
# (/usr/lib/postgresql/<ver>/bin) plus strace for the rotation tests against a real server, and
# systemd-analyze for the checks of the units (tests/test_systemd.py), installed only when
# missing. The tests run their own throw-away cluster, never Debian's `main`.
system-deps: build-deps
	@missing=""; \
	command -v getfattr    >/dev/null 2>&1 || missing="$$missing attr"; \
	ls /usr/lib/postgresql/*/bin/initdb /usr/lib/postgresql/*/bin/psql >/dev/null 2>&1 \
	                                       || missing="$$missing postgresql"; \
	command -v strace      >/dev/null 2>&1 || missing="$$missing strace"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	$(apt_install_missing)

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

# The hostile-input tests (tests/test_fuzz.py) with many more generated examples than `make test`
# runs (FUZZ_EXAMPLES per cheap target; targets that start a process or go through a real mount
# scale down from it). A few minutes at the default; see docs/security.md.
FUZZ_EXAMPLES ?= 5000
fuzz: setup
	SECRETFS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q tests/test_fuzz.py

bench: setup
	$(BIN)/python benchmarks/cli.py
	$(BIN)/python benchmarks/read.py
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/rotation.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/backends.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/fleet.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .hypothesis .ruff_cache *.egg-info

# -- make install -------------------------------------------------------------------------------
# A self-contained virtualenv in /opt/secretfs (the project and its dependencies, nothing from the
# system's site-packages), $(PREFIX)/bin/secretfs pointing into it, the systemd units in
# /etc/systemd/system, and /etc/secretfs/config.yaml (0600 in a 0700 folder) unless one exists.
# DESTDIR stages everything under another root (packaging, tests); paths written into the venv's
# scripts and the units are those of the final system. INSTALL_VENV=no lays out everything but
# the venv (when one is provided some other way).
PREFIX       ?= /usr/local
DESTDIR      ?=
EXTRAS       ?= openbao,aws
INSTALL_VENV ?= yes
PIP_FLAGS    ?=
OPT          := /opt/secretfs
UNITDIR      := /etc/systemd/system
CONFDIR      := /etc/secretfs
DOCDIR       := $(PREFIX)/share/doc/secretfs
UNITS        := secretfs.service secretfs-rotate.service secretfs-rotate.timer

# Files must be readable by the services' users (DynamicUser= consumers run `secretfs run`)
# whatever root's umask is; the config alone is private.
install: $(if $(filter yes,$(INSTALL_VENV)),build-deps)
	@set -e; umask 022; \
	if [ "$(INSTALL_VENV)" = yes ]; then \
	  echo "creating $(DESTDIR)$(OPT)"; \
	  $(PYTHON) -m venv $(DESTDIR)$(OPT); \
	  src=$$(mktemp -d); trap 'rm -rf "$$src"' EXIT; \
	  cp -r pyproject.toml README.md secretfs injector "$$src"/; \
	  find "$$src" -name __pycache__ -prune -exec rm -rf {} +; \
	  $(DESTDIR)$(OPT)/bin/python -m pip install --quiet --disable-pip-version-check $(PIP_FLAGS) \
	    "$$src$(if $(EXTRAS),[$(EXTRAS)])"; \
	  if [ -n "$(DESTDIR)" ]; then \
	    grep -rlI -- "$(DESTDIR)$(OPT)" $(DESTDIR)$(OPT)/bin $(DESTDIR)$(OPT)/pyvenv.cfg \
	      | xargs -r sed -i "s|$(DESTDIR)$(OPT)|$(OPT)|g"; \
	  fi; \
	fi; \
	install -d -m 0755 $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DOCDIR)/examples; \
	ln -sfn $(OPT)/bin/secretfs $(DESTDIR)$(PREFIX)/bin/secretfs; \
	for unit in $(UNITS); do \
	  install -m 0644 systemd/$$unit $(DESTDIR)$(UNITDIR)/$$unit; \
	  sed -i 's|/usr/local/|$(PREFIX)/|g' $(DESTDIR)$(UNITDIR)/$$unit; \
	done; \
	install -m 0644 docs/*.md $(DESTDIR)$(DOCDIR)/; \
	for example in systemd/examples/*.service; do \
	  install -m 0644 $$example $(DESTDIR)$(DOCDIR)/examples/; \
	  sed -i 's|/usr/local/|$(PREFIX)/|g' $(DESTDIR)$(DOCDIR)/examples/$${example##*/}; \
	done; \
	install -d -m 0700 $(DESTDIR)$(CONFDIR); \
	if [ -e $(DESTDIR)$(CONFDIR)/config.yaml ]; then \
	  echo "keeping $(DESTDIR)$(CONFDIR)/config.yaml"; \
	else \
	  install -m 0600 systemd/config.yaml $(DESTDIR)$(CONFDIR)/config.yaml; \
	fi; \
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	echo "installed; next: SECRETFS_CONFIG=$(CONFDIR)/config.yaml $(PREFIX)/bin/secretfs init &&" \
	     "systemctl enable --now secretfs (docs/systemd.md)"

# Removes what install put there, but never the config, the store, the key or the audit log.
uninstall:
	@set -e; \
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  systemctl disable --now $(UNITS) 2>/dev/null || true; \
	fi; \
	for unit in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$unit; done; \
	rm -f $(DESTDIR)$(PREFIX)/bin/secretfs; \
	rm -rf $(DESTDIR)$(DOCDIR) $(DESTDIR)$(OPT); \
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	echo "removed; kept $(CONFDIR) and /var/lib/secretfs (the store, its key and the audit log)"
