# Every target sets up .venv itself, pinned by constraints.txt, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench soak clean cluster test-system test-cluster ui

# The provider, then the emulator (its own distribution, under emulator/), both editable and pinned.
# Two calls, in this order: a venv made before the split has the provider's old hpc-emulator
# script, which reinstalling the provider removes; the emulator's install then puts it back.
$(STAMP): pyproject.toml emulator/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,bench,system]'
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ./emulator
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks

soak: $(STAMP)
	$(BIN)/python scripts/soak.py

# The example DAGs in the real Airflow UI (emulator, API server, scheduler, DAG processor, triggerer); Ctrl-C stops it all.
ui: $(STAMP)
	$(BIN)/python scripts/ui.py

# The production-shaped deployment: PostgreSQL, Redis, CeleryExecutor, two triggerers, S3, the emulator.
# Both say what to install and stop (exit 1) when the machine lacks the PostgreSQL or Redis server.
cluster: $(STAMP)
	@$(BIN)/python -m dev.cluster.prerequisites
	$(BIN)/python scripts/cluster.py

test-system: $(STAMP)
	@$(BIN)/python -m dev.cluster.prerequisites
	HPC_SYSTEM_TESTS=1 $(BIN)/python -m pytest tests/system -v -s -p no:cacheprovider --durations=0

test-cluster: test-system

clean:
	rm -rf $(VENV) .demo .pytest_cache
