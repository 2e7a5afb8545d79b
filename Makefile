# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pyproject.toml states compatible ranges; constraints.txt the exact tested set installed here.
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
DEMO_EXTRAS := test,lint
TEST_EXTRAS := test,lint,spark,onnx
DATA ?= data
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test lint bench clean

# A venv if there is none, pip upgraded, then one pip pass for the extras named ($1).
define install
@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "nlpctr needs Python 3.11, found " + sys.version.split()[0]'
test -d $(VENV) || $(PYTHON) -m venv $(VENV)
$(BIN)/pip install -q --upgrade pip
$(BIN)/pip install -q -c constraints.txt -e '.[$1]'
endef

$(STAMP): pyproject.toml constraints.txt
	$(call install,$(DEMO_EXTRAS))
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

# The tests also run the Spark path (tests/test_spark_store.py) and the ONNX export
# (tests/test_export.py); the demo needs neither. One pip pass installs both sets (a second pass
# after setup's re-resolved everything), and its stamps say so: a later `make demo` installs nothing.
TEST_STAMP := $(VENV)/.installed-test-$(DEPS_HASH)
$(TEST_STAMP): pyproject.toml constraints.txt
	$(call install,$(TEST_EXTRAS))
	rm -f $(VENV)/.installed-* && touch $(STAMP) $@

# The main job on the embedded default (local parquet, SQLite online store): the whole
# experiment protocol on Upworthy in its quick size (prepare, CTR history, frozen-BERT
# embeddings, Feast apply + materialize, E0-E4, redundancy; report in $(RUNS)/upworthy-quick/),
# then one online lookup from the store it built.
RUNS ?= runs
demo: setup
	$(BIN)/nlpctr experiment --dataset upworthy --quick --out $(RUNS)/upworthy-quick
	$(BIN)/nlpctr features get --data $(RUNS)/upworthy-quick/data --service cascade_frozen --impression 0

# The suite in TEST_WORKERS processes (pytest-xdist), each test file whole in one of them so
# its module fixtures are built once, handed out in collection order (tests/conftest.py puts the
# longest first) rather than by test count; TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

bench: setup
	$(BIN)/python bench/bench_embed.py
	$(BIN)/python bench/bench_feast.py

clean:
	rm -rf $(DATA) runs .pytest_cache
