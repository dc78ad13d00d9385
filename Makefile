# The two commands of the README. Both create .venv and install the pinned stack on first use.
#   make quickstart   set-up, then train the CPU-sized Shapes model, sample the benchmark prompts, score them
#   make test         set-up, then the test suite (what CI runs)
#   make test-slow    the slow tests (multi-process training, convergence orders); CI runs them too
PY ?= python3
VENV ?= .venv
WORKDIR ?= runs/quickstart
CONFIG ?= configs/shapes.py:cpu
GUIDANCE ?= 2.0
export TF_CPP_MIN_LOG_LEVEL ?= 3

$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --no-deps -r requirements.txt
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/python train.py --config=$(CONFIG) --workdir=$(WORKDIR)
	$(VENV)/bin/python sample.py --workdir=$(WORKDIR) --shapes_benchmark --num=4 \
	    --guidance=$(GUIDANCE) --out=$(WORKDIR)/benchmark_w$(GUIDANCE)
	$(VENV)/bin/python evaluate.py --samples=$(WORKDIR)/benchmark_w$(GUIDANCE)

test: setup
	$(VENV)/bin/python -m pytest -q

test-slow: setup
	$(VENV)/bin/python -m pytest -q -m slow

.PHONY: setup quickstart test test-slow
