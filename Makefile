# Two entry points for a new user: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test chaos chaos-secured etcd-kill9 bench lint typecheck check clean sysdeps

# The `libvirt` extra (libvirt-python, for `nvo3 agent run --libvirt`) compiles
# against the system libvirt: it needs gcc, pkg-config and libvirt's headers.
# Debian's libvirt-dev brings libvirt0, whose in-process test:///default driver
# the tests use (no libvirtd). Installed with apt-get when missing; fails otherwise.
SYSDEPS := gcc pkg-config libvirt-dev
APT := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSDEPS)

sysdeps:
	@if command -v gcc >/dev/null && pkg-config --exists libvirt 2>/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
	  echo "error: libvirt-python needs $(SYSDEPS) (gcc, pkg-config, libvirt headers);" \
	       "apt-get is not available: install them by hand, then run make again" >&2; exit 1; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	echo "installing $(SYSDEPS) with apt-get"; \
	$$SUDO env $(APT) || { $$SUDO apt-get update -q && $$SUDO env $(APT); } || { \
	  echo "error: apt-get could not install $(SYSDEPS)" >&2; exit 1; }

$(STAMP): pyproject.toml
	$(MAKE) --no-print-directory sysdeps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,libvirt]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nvo3 demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# The long fault-injection run (50 rounds, ~5 min here); results go to docs/reliability.md.
chaos: $(STAMP)
	$(BIN)/nvo3 chaos --rounds 50 --seed 1 --json chaos-results.json

# The same on the secured stack (TLS, NKeys, etcd RBAC; one identity per process).
chaos-secured: $(STAMP)
	$(BIN)/nvo3 chaos --secured --rounds 50 --seed 1 --json chaos-results-secured.json

# Does the bundled etcd keep its members identical when the leader is killed under
# load? (etcd 3.5.0-3.5.2 may not: docs/reliability.md, "etcd 3.5.1 and kill -9").
etcd-kill9: $(STAMP)
	$(BIN)/python -m nvo3.etcd_kill9 --runs 10 --kills 30

# The full benchmark (floors and system figures in one run, ~4 min); see docs/performance.md.
bench: $(STAMP)
	$(BIN)/nvo3 bench --json bench/results/full.json

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
