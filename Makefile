# Two commands do all the set-up on a fresh machine (scripts/setup.sh is idempotent and quick when done):
#   make quickstart   install, then run the quickstart sweep (real LoT sweep, local Ray, local MLflow store)
#   make test         install, then run the whole test suite (what .ci/run calls)
VENV ?= .venv

.PHONY: setup quickstart test test-quick lint bench notebook

setup:
	@bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/teachsweep run sweeps/quickstart.yaml

test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests

# a development loop: everything but the tests marked slow (killed processes, outages, clusters): about 8 of 20 minutes
test-quick: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check lib tests && $(VENV)/bin/ruff format --check lib tests

bench: setup
	$(VENV)/bin/teachsweep bench overhead && $(VENV)/bin/teachsweep bench lot

# the analysis notebook in JupyterLab (the `notebook` extra, installed here only: setup.sh leaves it out)
notebook: setup
	$(VENV)/bin/pip install -q -e '.[notebook]' && $(VENV)/bin/jupyter lab notebooks/analyze_sweep.ipynb
