# Two commands a new user needs: `make demo` and `make test`. Both install into $(VENV) first.
# A GPU user keeping their own torch: make demo TORCH= VENV_ARGS=--system-site-packages
VENV ?= .venv
VENV_ARGS ?=
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO := out/demo

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/hybridiff compile builtin:digits-sdxl --gpus 2 -o $(DEMO)/plan.json
	$(VENV)/bin/hybridiff run $(DEMO)/plan.json --prompt "a handwritten digit seven" --seed 3 -o $(DEMO)
	$(VENV)/bin/hybridiff eval accuracy $(DEMO) --digits
	@echo "image: $(DEMO)/image-0.png  report: $(DEMO)/report.json"

test: install
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/hybridiff compile builtin:tiny-sdxl --gpus 2 --threads 1 -o out/bench/plan.json
	$(VENV)/bin/hybridiff bench out/bench/plan.json --repeats 5 --threads 1 -o out/bench
	$(VENV)/bin/hybridiff compile builtin:tiny-sdxl --gpus 2 --batch 8 --threads 1 -o out/bench8/plan.json
	$(VENV)/bin/hybridiff bench out/bench8/plan.json --repeats 3 --threads 1 -o out/bench8

clean:
	rm -rf out
