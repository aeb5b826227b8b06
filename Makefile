# The two set-up commands of the README:  `make demo`  and  `make test`.
# Both create .venv on first use. torch is pinned to the release whose CPU wheel these machines carry;
# lmms-eval requires torchvision, whose PyPI wheels are CUDA builds that break next to a CPU torch and
# would drag torch up, so torch is held by a constraint and torchvision is removed (lmms-eval's core,
# transformers and this package do not need it).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= 2.13.0
TASKS  ?= synth_vqa_test,synth_pope_test,textvqa_val_local,mme_local,pope_local
# The real benchmarks' configs and scorers on a few local samples: they check the format, not the model.
FORMAT_CHECKS ?= textvqa_val_local,mme_local,pope_local
OUT    ?= runs/demo
MODEL_ARGS ?= controller=grpo,budget=200
# The built-in model's floor (docs/embedded-default.md): 0.58-0.76 at every measured plan; chance ~0.1.
FLOORS ?= --floor synth_vqa_test:exact_match=0.5
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	echo "torch==$(TORCH)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q "torch==$(TORCH)"
	PIP_CONSTRAINT=$(VENV)/constraints.txt $(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip uninstall -q -y torchvision
	$(PY) -c "import torch, lmms_eval.models as m; assert 'adaptive_molmoe' in m.AVAILABLE_MODELS; print('installed: torch', torch.__version__)"
	touch $@

demo: install
	rm -rf $(OUT)
	$(VENV)/bin/lmms-eval --model adaptive_molmoe --model_args $(MODEL_ARGS) \
		--include_path tasks --tasks $(TASKS) --output_path $(OUT) --log_samples
	$(PY) -m lmms_adaptive.tools.results $(OUT) --tasks $(TASKS) --format-checks $(FORMAT_CHECKS) $(FLOORS)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q
