# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stagewise-installed

.PHONY: demo test install lint docs bench-pages bench clean

# The venv sees system packages, so an already installed torch (say a CUDA build) is kept;
# otherwise torch==2.13.0 is installed (a CPU build; a looser pin can pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: GPT-2 (tiny) on 4 pipeline stages, built-in data, no download; the held-out loss every 50 steps
# beside the training loss, 30 warm-up steps then cosine decay, AdamW's weight decay as GPT-2's.
demo: $(STAMP)
	$(VENV)/bin/stagewise train --stages 4 --steps 300 --eval-every 50 --warmup-steps 30 --lr-schedule cosine \
		--weight-decay 0.1 --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The documentation site (mkdocs.yml, docs/), the API pages from the docstrings; a warning fails it. Into site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# docs/benchmarks.md from the benchmarks' JSON in docs/results/ (never typed by hand).
bench-pages: $(STAMP)
	$(PY) benchmarks/pages.py

bench: $(STAMP)
	$(PY) benchmarks/bench_schedules.py
	$(PY) benchmarks/bench_runtime.py
	$(PY) benchmarks/bench_partition.py

clean:
	rm -rf $(VENV) runs site .pytest_cache
