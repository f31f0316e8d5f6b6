# Two commands a new user needs: `make demo` and `make test`. Both install into $(VENV) first.
# A GPU user keeping their own torch: make demo TORCH= VENV_ARGS=--system-site-packages
VENV ?= .venv
VENV_ARGS ?=
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO := out/demo

.PHONY: install demo lint test bench bench-compiled bench-families strategies clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The ten digits in one call on 2 workers, timed side by side with the stock pipeline on one,
# each run eagerly and compiled (torch.compile; the first demo compiles for a few minutes, later
# ones load the kernels from ~/.cache/hybridiff).
demo: install
	$(VENV)/bin/hybridiff compile builtin:digits-sdxl --gpus 2 --batch 10 -o $(DEMO)/plan.json
	$(VENV)/bin/hybridiff bench $(DEMO)/plan.json --prompts examples/digits.txt --rounds 1 --repeats 1 --execution both \
	  --grid $(DEMO)/digits.png -o $(DEMO)
	$(VENV)/bin/hybridiff eval accuracy $(DEMO)/hybrid --digits

# ruff (pyproject.toml: pyflakes, pycodestyle, import order, bugbear), then the whole suite.
lint: install
	$(VENV)/bin/ruff check hybridiff tests examples

test: lint
	$(PY) -m pytest -q

# docs/benchmarks.md: one image of each built-in model, the ten digits, tiny-sdxl's batch of 8.
bench: install
	for m in digits-sdxl digits-sd3 tiny-sdxl; do \
	  $(VENV)/bin/hybridiff compile builtin:$$m --gpus 2 --threads 1 -o out/bench/$$m/plan.json && \
	  $(VENV)/bin/hybridiff bench out/bench/$$m/plan.json --prompt "a handwritten digit seven" --repeats 3 --rounds 4 -o out/bench/$$m || exit 1; \
	done
	$(VENV)/bin/hybridiff compile builtin:digits-sdxl --gpus 2 --batch 10 --threads 1 -o out/bench/digits10/plan.json
	$(VENV)/bin/hybridiff bench out/bench/digits10/plan.json --prompts examples/digits.txt --repeats 2 --rounds 4 -o out/bench/digits10
	$(VENV)/bin/hybridiff compile builtin:tiny-sdxl --gpus 2 --batch 8 --threads 1 -o out/bench/tiny8/plan.json
	$(VENV)/bin/hybridiff bench out/bench/tiny8/plan.json --repeats 1 --rounds 2 -o out/bench/tiny8
	$(MAKE) bench-families

# docs/benchmarks.md, compiled execution: forwards eager against compiled, then the ten digits and one
# digits-sd3 image with serial and hybrid each run eagerly and compiled, from plans costed compiled.
bench-compiled: install
	$(PY) scripts/forward_compiled.py
	$(VENV)/bin/hybridiff compile builtin:digits-sdxl --gpus 2 --batch 10 --threads 1 --execution compiled -o out/bench/digits10-compiled/plan.json
	$(VENV)/bin/hybridiff bench out/bench/digits10-compiled/plan.json --prompts examples/digits.txt --execution both --repeats 2 --rounds 2 \
	  -o out/bench/digits10-compiled
	$(VENV)/bin/hybridiff compile builtin:digits-sd3 --gpus 2 --threads 1 --execution compiled -o out/bench/digits-sd3-compiled/plan.json
	$(VENV)/bin/hybridiff bench out/bench/digits-sd3-compiled/plan.json --prompt "a handwritten digit seven" --execution both --repeats 3 \
	  --rounds 2 -o out/bench/digits-sd3-compiled

# docs/benchmarks.md, families: tiny Flux and tiny Qwen-Image (true CFG, two calls per step, forwards of
# 20-60 ms) against serial and diffusers' own Ulysses on the same 2 workers, and the from-scratch DiT
# of examples/custom_dit.py in its own loop, each against one worker, side by side.
bench-families: install
	$(VENV)/bin/hybridiff compile builtin:tiny-flux --gpus 2 --threads 1 --height 192 --width 192 -o out/bench/tiny-flux/plan.json
	$(VENV)/bin/hybridiff bench out/bench/tiny-flux/plan.json --peers diffusers-ulysses --prompt "a red cube on a table" --repeats 3 --rounds 4 -o out/bench/tiny-flux
	$(VENV)/bin/hybridiff compile builtin:tiny-qwen-image --gpus 2 --threads 1 --height 384 --width 384 -o out/bench/tiny-qwen-image/plan.json
	$(VENV)/bin/hybridiff bench out/bench/tiny-qwen-image/plan.json --peers diffusers-ulysses --prompt "a red cube on a table" --repeats 3 --rounds 4 -o out/bench/tiny-qwen-image
	for g in "" --two-calls; do \
	  $(VENV)/bin/python examples/custom_dit.py compile out/bench/dit$$g/plan.json $$g && \
	  OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node 2 examples/custom_dit.py bench out/bench/dit$$g/plan.json $$g || exit 1; \
	done

# docs/benchmarks.md, the strategy table: every strategy and the k sweep, side by side with serial.
strategies: install
	for m in digits-sdxl digits-sd3; do \
	  $(VENV)/bin/hybridiff bench builtin:$$m --gpus 2 --k 5,10,20,30 --plot -o out/strategies/$$m || exit 1; \
	done
	$(VENV)/bin/hybridiff bench builtin:tiny-sdxl --gpus 2 --k 5,10,20,30 --num-images-per-prompt 4 --plot -o out/strategies/tiny-sdxl

clean:
	rm -rf out
