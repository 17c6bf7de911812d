# `make demo` and `make test` each create or refresh .venv themselves, with the tested versions
# (constraints.txt); the stamp changes, and the install reruns, when pyproject.toml or constraints.txt does.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) | sha1sum | cut -c1-10)
DEV_STAMP := $(STAMP)-dev
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo demo-audio test lint venv dataset espeak constraints clean device-carry

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing selfsup into $(VENV) with the tested versions: PyTorch with its CUDA libraries, Ray, FAISS" \
	  "and the rest, about 6 GB installed (3.4 GB of it CUDA libraries) and several minutes of pip;" \
	  "without an NVIDIA GPU, README.md (Install) gives the CPU-only PyTorch"
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[cpu]'
	@touch $@

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev,cpu]'
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) --no-deps lightly lightning-utilities  # the `reference` extra, torch left alone
	@touch $@

venv: $(STAMP)

# Record the versions installed in .venv as the tested ones (after an upgrade that passed `make test`).
constraints:
	@{ sed -n '1,2p' $(CONSTRAINTS); $(BIN)/python -m pip freeze --all --exclude pip --exclude-editable | grep -iv '^selfsup=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

# Debian's dataset-fashion-mnist, when it is missing and apt-get can install it; otherwise the
# demo downloads the official files.
dataset:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ($$SUDO apt-get install -y -q dataset-fashion-mnist || ($$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist)) \
	  || echo "could not install dataset-fashion-mnist; the demo will download Fashion-MNIST"; \
	fi

demo: $(STAMP) dataset
	$(BIN)/selfsup demo $(if $(wildcard $(FMNIST)),,--download)

# espeak-ng (the audio demo's spoken digits), when it is missing and apt-get can install it; otherwise
# the demo names the package to install.
espeak:
	@if ! command -v espeak-ng >/dev/null && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ($$SUDO apt-get install -y -q espeak-ng || ($$SUDO apt-get update -q && $$SUDO apt-get install -y -q espeak-ng)) \
	  || echo "could not install espeak-ng"; \
	fi

# Real speech (Debian packages) + spoken digits (espeak-ng) -> wav2vec2-tiny -> probe vs log-mel and random init.
demo-audio: $(STAMP) espeak
	$(BIN)/selfsup demo --audio

# ruff (its rules and format: pyproject.toml [tool.ruff]) and mypy ([tool.mypy]), at the versions the dev extra
# pins; `make test` runs it first, and so does CI (.ci/run)
lint: $(DEV_STAMP)
	$(BIN)/ruff check selfsup benchmarks tests
	$(BIN)/ruff format --check selfsup benchmarks tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# What a GPU check (benchmarks/device_check.py) carries to the device image, which has Python 3.12, torch,
# torchvision, torchaudio, timm and pytest only: the wheels of the other packages the training loop imports
# (no Ray, W&B or FAISS), at constraints.txt's versions, and Fashion-MNIST's idx files; 64 MiB at most.
DEVICE := .device
DEVICE_WHEELS := pydantic pydantic_core annotated-types typing-inspection typing_extensions webdataset braceexpand \
  PyYAML tqdm soundfile cffi pycparser
FMNIST_URL := http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/
device-carry:
	rm -rf $(DEVICE) && mkdir -p $(DEVICE)/wheels $(DEVICE)/fashion-mnist
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(DEVICE)/wheels $$(for p in $(DEVICE_WHEELS); do grep -i "^$$p==" $(CONSTRAINTS) || exit 1; done)
	if [ -d $(FMNIST) ]; then cp $(FMNIST)/*ubyte* $(DEVICE)/fashion-mnist/; else \
	  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do \
	    curl -fsSL -o $(DEVICE)/fashion-mnist/$$f.gz $(FMNIST_URL)$$f.gz || exit 1; done; fi
	@size=$$(du -sm $(DEVICE) | cut -f1); echo "$(DEVICE): $$size MiB"; test $$size -le 64

clean:
	rm -rf $(VENV) runs data/fashion-mnist
