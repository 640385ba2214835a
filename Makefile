# Every target sets up .venv itself, pinned by constraints.txt, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench soak clean

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

clean:
	rm -rf $(VENV) .demo .pytest_cache
