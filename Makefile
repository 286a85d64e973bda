# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment at .venv first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow bench clean

venv: $(STAMP)

# torch is installed first and pinned: the CPU build on the team's machines
# satisfies it; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The trained MiniLM serving real sentences (token lengths of English prose, examples/) in batches of 8
# padded to 128, as its shipped tokenizer pads: exact padding removal wins, measured on ONNX Runtime.
demo: $(STAMP)
	$(VENV)/bin/tfcompile optimize minilm --batch 8 --seq 128 --lengths-file examples/sentence_lengths.txt \
		--target cpu --measure --repeat 5 -o out/demo

# Two workers, one test module each at a time (module fixtures are built once): the suite is
# mostly single-threaded tracing and export, so a 2-core host runs two modules at once.
test: $(STAMP)
	$(VENV)/bin/ruff check tfcompile tests benchmarks
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=10

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) out .pytest_cache
