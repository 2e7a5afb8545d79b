# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
DATA ?= data
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "nlpctr needs Python 3.11, found " + sys.version.split()[0]'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint]'
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

# The main job on the embedded default (local parquet, SQLite online store):
# ingest Upworthy, CTR history, frozen-BERT embeddings, Feast apply + materialize, one lookup.
demo: setup
	$(BIN)/nlpctr data prepare --dataset upworthy --out $(DATA)/upworthy
	$(BIN)/nlpctr ctr-stats --data $(DATA)/upworthy
	$(BIN)/nlpctr embed --data $(DATA)/upworthy
	$(BIN)/nlpctr features apply --data $(DATA)/upworthy
	$(BIN)/nlpctr features materialize --data $(DATA)/upworthy
	$(BIN)/nlpctr features get --data $(DATA)/upworthy --service cascade_frozen --impression 0

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/bench_embed.py
	$(BIN)/python bench/bench_feast.py

clean:
	rm -rf $(DATA) runs .pytest_cache
