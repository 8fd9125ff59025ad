# Two commands: `make run` (the VQA job on its embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

WORDNET := /usr/share/wordnet/index.sense

.PHONY: run test install clean demo-model

install: $(STAMP)

# WordNet 3.0 (Debian) backs the LRS-VQA synonym rule; nothing is downloaded at run time.
$(WORDNET):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index; \
	else \
		echo "WordNet is missing: run 'sudo apt-get install wordnet-base wordnet-sense-index'" >&2; exit 1; \
	fi

# torch is installed on its own first so the CPU wheel is taken instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

run: $(STAMP)
	$(BIN)/python -m jobs.vqa

test: $(STAMP) $(WORDNET)
	$(BIN)/python -m pytest

# The shipped demo model, from scratch (about 30 min on 2 cores): data and untrained model, the
# fine-tuning run of configs/train/demo.yaml, then its export copied into the package.
demo-model: $(STAMP)
	$(BIN)/python -m uhr.demo
	$(BIN)/python -m jobs.finetune --config configs/train/demo.yaml --overwrite
	rm -rf uhr/assets/demo-model
	cp -r outputs/demo/export uhr/assets/demo-model

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
