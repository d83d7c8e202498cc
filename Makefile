# Two entry points for a new user: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test chaos bench lint typecheck check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
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

# The full benchmark (floors and system figures in one run, ~4 min); see docs/performance.md.
bench: $(STAMP)
	$(BIN)/nvo3 bench --json bench/results/full.json

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
