# Two entry points that work on a fresh machine with only Python and the package
# registries: `make demo` (the main job) and `make test`. Both create .venv on first use
# and install the exact tested versions from constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[tfds,test,report,ray]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/bdjax demo

# three workers on two cores: XLA compiles on one thread, so a third process fills the
# gaps (measured on the 2-core CPU, same commit: 685 s against 731 s with two)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --durations=15

# The benchmark harness on this machine (--quick: a few minutes on a CPU), with the
# PyTorch side (torch, CPU build, from constraints.txt).
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/bdjax bench --quick

clean:
	rm -rf $(VENV) runs
