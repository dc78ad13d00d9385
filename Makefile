# The two commands of the README. Both create .venv and install the pinned stack on first use.
#   make quickstart   set-up, then train the CPU-sized Shapes model, sample the benchmark prompts, score them
#   make test         set-up, then the default test tier (a few minutes; what CI runs first)
#   make test-full    the full tier: 1-vs-8-device equivalence, multi-process training, convergence
#                     orders, benchmark scripts (CI runs it too)
PY ?= python3
VENV ?= .venv
WORKDIR ?= runs/quickstart
CONFIG ?= configs/shapes.py:cpu
GUIDANCE ?= 2.0
# pytest-xdist processes for both tiers (each test file stays on one).
TEST_WORKERS ?= 2
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
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-full: setup
	$(VENV)/bin/python -m pytest -q -m full -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup quickstart test test-full
