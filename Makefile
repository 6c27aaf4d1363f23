# r1-factory: `make demo` and `make test` install everything they need first.
VENV    ?= .venv
PYTHON  ?= python3
# The CPU wheel on a machine without a GPU; set TORCH_SPEC to a CUDA build's spec on GPU hosts.
TORCH_SPEC ?= torch==2.13.0
WORKDIR ?= .r1
STAMP   := $(VENV)/.installed
BIN     := $(VENV)/bin
export PREFECT_HOME ?= $(abspath $(WORKDIR))/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export RAY_AUTH_MODE ?= disabled

.PHONY: setup constraints vllm-env doctor demo demo-seeds ablation-lc test test-slow test-all ui ui-stop lint bench bench-rs bench-sandbox bench-rewards bench-rl bench-tune bench-memory bench-generation clean

setup: $(STAMP)

# constraints.txt: every version this project is tested with (pyproject.toml keeps ranges, for
# use as a library); torch comes from TORCH_SPEC, its CUDA or CPU build being the host's choice
# pip's chatter (index warnings, build-backend notices) goes to a log, shown only on failure
SETUP_LOG := $(WORKDIR)/logs/setup.log
$(STAMP): pyproject.toml constraints.txt
	@mkdir -p $(dir $(SETUP_LOG))
	@echo "setting up $(VENV) (pip log: $(SETUP_LOG))"
	@{ { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); } \
	  && $(BIN)/pip install -q --upgrade pip \
	  && $(BIN)/pip install -q -c constraints.txt "$(TORCH_SPEC)" \
	  && $(BIN)/pip install -q -c constraints.txt -e ".[dev]"; } > $(SETUP_LOG) 2>&1 \
	  || { tail -n 40 $(SETUP_LOG); echo "make setup failed: full pip log in $(SETUP_LOG)"; exit 1; }
	@touch $(STAMP)

# Refresh constraints.txt from the environment the tests passed in (after `pip install -U ...` there)
constraints:
	{ echo "# pip constraints: the versions r1-factory is tested with (make constraints; see Makefile)"; \
	  $(BIN)/pip freeze --all --exclude-editable | grep -viE '^(pip|torch|triton|nvidia-[a-z0-9-]+)=='; } > constraints.txt

# vLLM's own environment (its pins clash with Prefect's), for rollout.backend vllm and `vllm serve`:
# the same Python as $(VENV), the pinned set of infra/vllm-requirements.txt (CUDA wheels), then checked
VLLM_VENV ?= .venv-vllm
vllm-env: setup
	test -x $(VLLM_VENV)/bin/python || $(BIN)/python -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q -r infra/vllm-requirements.txt
	$(BIN)/r1 doctor --set rollout.backend=vllm --set rollout.vllm.python=$(abspath $(VLLM_VENV))/bin/python

doctor: setup
	$(BIN)/r1 doctor $(ARGS)

demo: setup
	$(BIN)/r1 run pipeline $(ARGS)

# The README's results over seeds: the pipeline once per seed (each seed its own run folder; a
# finished seed is skipped) and the language-consistency ablation from that seed's cold start,
# then every stage and finding per seed and pooled (bench/seeds.py; ARGS go to the pipeline
# only: bench/seeds.py looks for the default profile's runs)
SEEDS ?= 0 1 2
# the ablation's override is bench/seeds.py's (which finds its runs with it), read once per target
LC_ABLATION = lc=$$($(BIN)/python bench/seeds.py --ablation-args) && test -n "$$lc" ||  \
	{ echo "make: bench/seeds.py --ablation-args printed nothing" >&2; exit 1; }
demo-seeds: setup
	$(LC_ABLATION); for seed in $(SEEDS); do $(BIN)/r1 run pipeline --set runtime.seed=$$seed $(ARGS) || exit 1; \
		$(BIN)/r1 run stage reasoning_rl --init-model "$$($(BIN)/python bench/seeds.py --cold-start-of $$seed)" \
			--no-register $$lc --set runtime.seed=$$seed || exit 1; done
	$(BIN)/python bench/seeds.py --seeds $(SEEDS)

# After `make demo`: reasoning RL again from the same cold-start model with the language-
# consistency reward weighted 0 (still logged); compare `eval/language_mixing_rate` in MLflow.
ablation-lc: setup
	$(LC_ABLATION); $(BIN)/r1 run stage reasoning_rl --init-model models:/r1-cold-start@newest --no-register $$lc $(ARGS)

# `make test`: every test but the slow-marked end-to-end ones (real pipelines, fault drills);
# `make test-slow` runs those; CI (.ci/run) runs both, so nothing is left untested
test: setup
	$(BIN)/pytest -v -m "not slow" $(ARGS)

test-slow: setup
	$(BIN)/pytest -v -m slow $(ARGS)

test-all: setup
	$(BIN)/pytest -v $(ARGS)

# Prefect UI (deployments served) + MLflow UI on 127.0.0.1, on the demo's stores; Ctrl-C stops all
ui: setup
	$(BIN)/r1 ui --set runtime.workdir=$(WORKDIR) $(ARGS)

ui-stop: setup
	$(BIN)/r1 ui --stop --set runtime.workdir=$(WORKDIR)

lint: setup
	$(BIN)/ruff check r1core tasks flows tests bench

bench: setup
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,bench]"
	$(BIN)/python bench/grpo_vs_trl.py

# 600k synthetic candidates: verify + filter + dedupe + write, Ray Data vs a single-process loop
bench-rs: setup
	$(BIN)/python bench/rejection_sampling.py $(ARGS)

# the code-reward sandbox: calls/s through the warm worker pool vs a cold process per call
bench-sandbox: setup
	$(BIN)/python bench/sandbox.py $(ARGS)

# worst-case time of one reward call on the attacks of issue 16 and random strings
bench-rewards: setup
	$(BIN)/python bench/rewards.py $(ARGS)

# GRPO after SFT: accuracy on the problems it trains on vs unseen ones (needs a `make demo` run)
bench-rl: setup
	$(BIN)/python bench/rl_generalisation.py $(ARGS)

# a stage's settings chosen on a validation split of train prompts (needs a `make demo` run),
# e.g. ARGS="--section distill.sft"; the held-out set is never used
bench-tune: setup
	$(BIN)/python bench/tune.py $(ARGS)

# peak memory per worker of one GRPO update: micro-batches, chunked log-probs, DDP vs FSDP, vs `r1 plan`
# (`ARGS=--gpu` on a GPU machine: a ~1B model in bf16, with MFU)
bench-memory: setup
	$(BIN)/python bench/memory.py $(ARGS)

# the torch engine's real tokens/s for G = 8 groups, its decode loop vs HF generate on repeated
# prompts, interleaved in one run (needs a `make demo` run for its R1-Zero model)
bench-generation: setup
	$(BIN)/python bench/generation.py $(ARGS)

clean:
	rm -rf $(WORKDIR)
