# The two commands a user needs: `make run` (the stack on this machine) and `make test`.
PY := .venv/bin/python

.PHONY: setup run test lint model clean
setup:
	@bash scripts/setup.sh

model: setup
	@$(PY) -m services.engine.model smollm2 >/dev/null

run: model
	@$(PY) -m services.cli run

test: model
	@$(PY) -m pytest

lint: setup
	@$(PY) -m ruff check shared services tests
	@$(PY) -m mypy shared services tests

clean:
	rm -rf run .pytest_cache .mypy_cache .ruff_cache
