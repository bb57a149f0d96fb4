# The few commands people type. `make test` works on a fresh clone: it builds .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# CPU torch for machines without a GPU; a GPU site installs its own torch and `pip install -e .`
CONSTRAINTS ?= constraints/cpu.txt

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[test,reference,demo]'
	touch $(STAMP)

install: $(STAMP)  ## set up .venv/ with FastServe and its test extras

demo: install  ## the main job on this machine: train, bulk inference, a report (./fastserve-demo)
	$(PY) -m fastserve.jobs demo --dir fastserve-demo

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two test processes: most tests wait on subprocesses. Whole files go to a worker, so each Slurm
# test cluster (test_slurm.py, test_multinode.py) lives on one.
TEST_WORKERS ?= 2

test: lint  ## lint, then the whole test suite (installs Debian's Slurm for its tests where it can)
	./slurm/install-deps.sh
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=30

bench: install  ## benchmarks; figures go to bench/RESULTS.md
	$(PY) -m bench.memory
	$(PY) -m bench.train_pipeline
	$(PY) -m bench.throughput --rows 1000 --shards 100 --prompts 192 --rounds 2 --slots 64
	$(PY) -m bench.prompting --rows 128 --rounds 2
	$(PY) -m bench.recommend
	$(PY) -m pytest -q -s tests/test_run_folder_model.py --hypothesis-profile nightly  # the run folder, longer

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache fastserve-demo fastserve-report
