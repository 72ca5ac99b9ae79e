# The two commands a fresh clone needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench

venv: $(STAMP)

# torch first, pinned, so no later resolution can pull a CUDA build; then everything else in one
# pip command with the constraints file so the resolver settles once (s3fs/fsspec/aiobotocore/botocore
# move together, see constraints.txt).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/gigaseg demo

test: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	$(BIN)/python -m benchmarks.feed_rate
	$(BIN)/python -m benchmarks.vs_monai
	$(BIN)/python -m benchmarks.pipeline_efficiency
	$(BIN)/python -m benchmarks.pipeline_efficiency --size 8192 --images 4 --threads 1
	$(BIN)/python -m benchmarks.memory_scaling

clean:
	rm -rf $(VENV) build *.egg-info
