# make run | make test | make lint | make check-audio | make bench | make fuzz  (ARGS="--voice marin")
SHELL := /bin/bash
VENV := .venv
ARGS ?=

# The newest Python 3.10+ on PATH (macOS's own /usr/bin/python3 may be 3.9).
PYTHON := $(shell for p in python3.14 python3.13 python3.12 python3.11 python3.10 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
	2>/dev/null && { echo $$p; break; }; done)

.PHONY: run test lint check-audio bench fuzz sox clean

run: $(VENV)/.run sox
	@$(VENV)/bin/python realtime_sox.py $(ARGS)

check-audio: $(VENV)/.run sox
	@$(VENV)/bin/python realtime_sox.py --check-audio $(ARGS)

test: $(VENV)/.dev
	$(VENV)/bin/python -m pytest -q -n 2 -m "not real_audio" --durations=10 tests
	$(VENV)/bin/python -m pytest -q -m real_audio --durations=5 tests

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check --line-length 110 --select E,F,W,B,UP,I realtime_sox.py tests bench
	$(VENV)/bin/mypy --strict realtime_sox.py

bench: $(VENV)/.dev
	$(VENV)/bin/python bench/run.py

# A hostile server at length: 40 seeds of odd events and broken frames (the suite runs a few).
fuzz: $(VENV)/.dev
	$(VENV)/bin/python bench/fuzz.py $(ARGS)

$(VENV)/bin/python:
	@if [ -z "$(PYTHON)" ]; then echo "error: Python 3.10 or newer is needed:" \
		"brew install python (macOS) or sudo apt-get install python3 python3-venv"; exit 1; fi
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run: requirements.txt | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	@touch $@

# uv's cache gets the script's own inline dependencies once, here (online, like pip), so the test
# of `uv run realtime_sox.py` can run offline.
$(VENV)/.dev: requirements.txt requirements-dev.txt realtime_sox.py | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -r requirements-dev.txt
	@UV_CACHE_DIR=$(VENV)/uv-cache $(VENV)/bin/uv run -q --no-config --python $(VENV)/bin/python \
		realtime_sox.py --help >/dev/null || echo "note: uv could not fetch the script's packages;" \
		"the uv run test will skip"
	@touch $@ $(VENV)/.run

sox:
	@command -v sox >/dev/null 2>&1 || { \
	if [ "$$(uname)" = Darwin ] && command -v brew >/dev/null 2>&1; then brew install sox; \
	elif [ "$$(uname)" = Darwin ]; then echo "error: sox is missing: install Homebrew (https://brew.sh), then: brew install sox"; exit 1; \
	elif command -v apt-get >/dev/null 2>&1; then echo "error: sox is missing: sudo apt-get install sox libsox-fmt-pulse"; exit 1; \
	elif command -v dnf >/dev/null 2>&1; then echo "error: sox is missing: sudo dnf install sox"; exit 1; \
	elif command -v pacman >/dev/null 2>&1; then echo "error: sox is missing: sudo pacman -S sox"; exit 1; \
	else echo "error: sox is missing: install it with your package manager (https://sourceforge.net/projects/sox/)"; exit 1; fi; }

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/out
