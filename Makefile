# One-line wrappers; CI (.ci/run) runs `make install`, `make lint` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch pin: a CPU build here (it lies on this machine's disk), the CUDA build from the index elsewhere.
TORCH  ?= torch==2.13.0
# Pixels are bit-exact with the reference at this Pillow (image resizing is Pillow-version sensitive).
PILLOW ?= pillow==13.0.0
# The demo model: a test-size DeepSeek-VL2 trained here to read numbers and point (vl2edge/train_demo.py).
DEMO   := models/trained-tiny

.PHONY: install test test-all demo train-demo quantize export lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "vl2edge needs Python >= 3.10"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "$(PILLOW)"
	$(PY) -m pip install -q -e ".[torch,export,serve,pdf,ray,dev]"
	touch $@

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

# Fresh pictures (a number, a red square); the trained demo model reads the one and points at the other, through
# the pipeline `vl2edge run` uses; each answer is judged against what was drawn (vl2edge/demo_run.py).
demo: install
	$(PY) -m vl2edge.demo_run --model $(DEMO) --out models/demo

# The demo model again, from scratch, on 2 CPU cores (fixed seeds; times in models/trained-tiny/training.json):
# reading first, then every task (8,000 steps), then a round weighted to grounding (3,000 steps). A stopped
# stage goes on where it stopped: the same command with --resume (checkpoints every 5 minutes in
# $(TRAIN_OUT).training). TRAIN_OUT is replaced when a stage is whole.
TRAIN_OUT ?= $(DEMO)
TRAIN     := $(PY) -m vl2edge.train_demo --out $(TRAIN_OUT) --overwrite

train-demo: install
	$(TRAIN) --variant mha --steps 8000
	$(TRAIN) --init $(TRAIN_OUT) --steps 3000 --lr 5e-4 --seed 1 --mix ground=0.6,number=0.25,count=0.1,wide=0.05

# make quantize|export [MODEL=dir-or-hub-id] [RECIPE=int4-experts|int8|int4|float32] [OUT=dir]; MODEL defaults
# to the demo model
MODEL  ?= $(DEMO)
RECIPE ?= int4-experts

quantize: install
	$(VENV)/bin/vl2edge quantize $(MODEL) $(or $(OUT),models/$(notdir $(MODEL))-$(RECIPE)) --recipe $(RECIPE)

export: install
	$(VENV)/bin/vl2edge export --model $(MODEL) --out $(or $(OUT),models/$(notdir $(MODEL))-onnx-$(RECIPE)) \
		--recipe $(RECIPE)

# ruff (style, imports, common bugs) and mypy (basic mode: the annotated seams; config in pyproject.toml)
lint: install
	$(PY) -m ruff check vl2edge quant export tests bench
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
