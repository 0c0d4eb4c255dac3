# The two commands a user needs: `make run` (the stack on this machine) and `make test`.
PY := .venv/bin/python

.PHONY: setup run test lint model clean bench bench-sweep bench-sim profile-engine loadtest
setup:
	@bash scripts/setup.sh

model: setup
	@$(PY) -m offline.model smollm2 >/dev/null

run: model
	@$(PY) -m offline.cli run

test: model
	@$(PY) -m pytest

# Benchmarks (docs/benchmarks.md): `make bench` is the load sweep (about 45 min on 2 cores).
bench: model
	@$(PY) -m bench

bench-sweep: model
	@$(PY) -m bench sweep

bench-sim: setup
	@$(PY) -m bench sim --scale-gpus 8  # 64 GPUs: --parts scale --scale-gpus 64 --scale-skip prompt-hrrn (about 10 min)

profile-engine: model
	@$(PY) -m bench profile-engine

# Against a running stack (`make run` in another terminal): 2 minutes of Locust, headless.
loadtest: setup
	@$(PY) -m locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 \
		-u 7 -r 2 -t 2m --trace-rate 0.5 --csv results/locust --only-summary

lint: setup
	@$(PY) -m ruff check shared services offline tests bench loadtest
	@$(PY) -m mypy shared services offline tests bench

clean:
	rm -rf run .pytest_cache .mypy_cache .ruff_cache
