# The lab's two commands, on a fresh machine with Python 3.11 and make:
#   make notebook   install into .venv, execute the notebook headless (offline: the bundled sample),
#                   write the executed notebook with its plot to build/lab2_streaming_lm.html
#   make test       install into .venv, run the unit tests and nbval on the notebook (under 4 minutes)
#   make test-slow  the end-to-end runs marked slow: training and its resumes, torchrun, Hub faults
# ONLINE=1 make notebook streams the real WikiText-103 from the Hub instead (and fails within seconds
# if the Hub cannot be reached, instead of quietly using the sample).
#   make lint       ruff check and ruff format --check (CI runs it before the tests)
#   make test-floor the tokenizing, resume, mixture and training tests again with the lowest versions
#                   requirements.txt allows (CI runs it)
# make benchmark  measures throughput and memory, writes docs/benchmark.md and docs/benchmark.png (a few minutes)
#   make colab-check  a venv pinned to Colab's runtime (tests/colab-runtime.txt), the notebook's Colab install
#                   step on top (scripts/colab_setup.py: what it kept, replaced, added), then nbval on the notebook

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
ONLINE ?= 0
ifeq ($(ONLINE),1)
  HF_ENV := LAB_SOURCE=hub
else
  HF_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
endif

FLOOR_VENV ?= .venv-floor
COLAB_VENV ?= .venv-colab

.PHONY: install notebook test test-slow lint test-floor benchmark colab-check

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	# a CPU build of torch first, so that requirements.txt's torch>=2.4 installs nothing more
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

notebook: install
	$(HF_ENV) $(PY) -m jupyter nbconvert --to html --execute lab2_streaming_lm.ipynb --output-dir build
	@echo "report: build/lab2_streaming_lm.html"

test: install
	$(PY) -m pytest -m "not slow"

test-slow: install
	$(PY) -m pytest -m slow -p no:nbval -o addopts="" -p no:cacheprovider tests

# the resume and training tests again, with every requirement at the lowest version requirements.txt
# allows (torch stays at $(TORCH): older CPU builds are not on this disk; PyPI's are CUDA builds of GBs)
test-floor:
	python3 -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install --quiet "$(TORCH)"
	sed -E 's/>=/==/; s/#.*//' requirements.txt | grep -vE '^torch==|^\s*$$' > $(FLOOR_VENV)/floor.txt
	$(FLOOR_VENV)/bin/pip install --quiet -r $(FLOOR_VENV)/floor.txt pytest hypothesis
	$(FLOOR_VENV)/bin/pip list 2>/dev/null | grep -iE '^(datasets|transformers|tiktoken|tokenizers|numpy|pyarrow|torch) '
	$(FLOOR_VENV)/bin/python -m pytest -o addopts="" -q -m "not slow" tests/test_tokenize.py tests/test_dataset.py \
		tests/test_epochs.py tests/test_checkpoint.py tests/test_mixing.py tests/test_training.py

# Colab as it ships, then the README's Colab install step, then the notebook re-executed and compared (nbval)
colab-check:
	rm -rf $(COLAB_VENV) && python3 -m venv $(COLAB_VENV)
	$(COLAB_VENV)/bin/pip install --quiet "$(TORCH)"
	$(COLAB_VENV)/bin/pip install --quiet -r tests/colab-runtime.txt
	$(COLAB_VENV)/bin/python scripts/colab_setup.py
	$(COLAB_VENV)/bin/pip install --quiet pytest nbval
	$(HF_ENV) $(COLAB_VENV)/bin/python -m pytest -p no:cacheprovider -o addopts="" --nbval --nbval-current-env \
		--nbval-cell-timeout=600 -q lab2_streaming_lm.ipynb

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# LitData is the peer of the token-cache rows, for the benchmark only (--no-deps: its extras pull torchvision)
benchmark: install
	$(PY) -m pip install --quiet --no-deps "litdata==0.2.76"
	$(PY) -m pip install --quiet lightning-utilities obstore tifffile boto3
	$(PY) scripts/benchmark.py
