# One command each: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.perceive-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,examples,lightning]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --out outputs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile  # two workers: the 2-core CI machine

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_perceiver.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
