# Two entry points for a fresh machine: `make demo` and `make test`.
# Both build .venv from nothing when it is missing and bring it up to date otherwise.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PIP_C := $(PIP) install -c constraints.txt
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: install demo test test-fast lint crd docs bench clean

install:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first and pinned: a later resolve must not pick another build.
	$(PIP_C) -q torch==2.14.1 torchvision==0.29.1
	# DeepSpeed is an sdist; its CPU path needs no compiled ops.
	DS_BUILD_OPS=0 $(PIP_C) -q --no-build-isolation deepspeed
	$(PIP_C) -q -e '.[dev,hf]'

# The digits example: real images written as PNG files, staged into the embedded S3 store,
# a 2-process linear probe, outputs copied to runs/digits-linear-probe/.
demo: install
	$(VENV)/bin/evaclip datasets digits .cache/datasets/digits
	$(VENV)/bin/evaclip run examples/digits-linear-probe.yaml --local --nproc 2 \
	  --stage .cache/datasets/digits=s3://evaclip-demo/digits --copy-to runs

test: install
	$(VENV)/bin/pytest -q -x -p no:randomly

lint: install
	$(VENV)/bin/ruff check .

crd: install
	$(VENV)/bin/evaclip crd > crds/training.evaclip.io_evaclipfinetunes.yaml
	# The Helm chart templates the same CRD from its own copy.
	cp crds/training.evaclip.io_evaclipfinetunes.yaml charts/evaclip-operator/files/

docs: install
	$(VENV)/bin/evaclip docs spec-reference > docs/spec-reference.md

clean:
	rm -rf $(VENV) .cache runs
