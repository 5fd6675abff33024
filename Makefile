# capsnet: the documented entry points.  `make train` and `make test` install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Data root: $CAPSNET_DATA_DIR if set, else ./data, else a sibling shared/data checkout.
CAPSNET_DATA_DIR ?= $(or $(patsubst %/MNIST/raw,%,$(firstword $(wildcard data/MNIST/raw ../shared/data/MNIST/raw))),data)
export CAPSNET_DATA_DIR
ARGS ?=
# reproduce-table: PROFILE=smoke|fast|paper (default: fast with a GPU, smoke without);
# EXPERIMENTS adds affnist on request; LAUNCHER=ray_gpus (many GPUs, one machine or a Ray cluster)
# or slurm (a SLURM cluster); JOBS_PER_GPU=2 runs two jobs at once on each GPU under ray_gpus;
# DETACH=1 runs it in the background (log in multirun/), e.g. from a cluster's login node.
PROFILE ?= $(shell $(PY) -c "import torch; print('fast' if torch.cuda.is_available() else 'smoke')" 2>/dev/null || echo smoke)
EXPERIMENTS ?= table1 multimnist
LAUNCHER ?=
JOBS_PER_GPU ?= 1
WANDB ?=
DETACH ?=

REPORT_DIRS ?= $(addprefix multirun/,$(EXPERIMENTS))
.PHONY: install train test test-unit test-docs test-faults test-engines slurm-start slurm-stop test-slow test-gpu lint format bench reproduce-table reproduce-routing reproduce-cifar10 report clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,launchers,optuna]'
	touch $@

install: $(VENV)/.installed

# CapsNet r=3 + reconstruction on MNIST.  Without a GPU: profile=demo (3k digits, about a
# minute); with one: the paper's schedule.  Extra overrides: make train ARGS="routing.iters=1".
train: install
	@profile=$$($(PY) -c "import torch; print('paper' if torch.cuda.is_available() else 'demo')"); \
	if [ "$$profile" = demo ]; then echo "No GPU found: training with profile=demo (3,072 digits, one epoch, about a minute on a CPU; not the paper's schedule). Pass ARGS=profile=paper to override."; fi; \
	$(PY) src/train.py profile=$$profile $(ARGS)

test: install
	$(PY) -m pytest -q

# The pure-torch tests: no data, no subprocesses.
test-unit: install
	$(PY) -m pytest -q tests/unit

# Every command in README.md and docs/*.md, run at smoke scale (tests/docs/).
test-docs: install
	$(PY) -m pytest -q -m docs -rA

# The same checks as .pre-commit-config.yaml; CI runs them before the tests.
lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: install
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

# Fault injection (tests/faults/): real runs killed at every phase, full and read-only disks,
# two processes on one run dir, damaged files; each rerun checked against an uninterrupted run.
test-faults: install
	$(PY) -m pytest -q -m faults -rP

# The real engines: a local Ray with declared GPUs, gloo DDP in 2 and 3 processes, a Ray head
# (scripts/ray/) and a single-node SLURM cluster (scripts/slurm/, root; installs Debian's slurm
# packages when missing).  The tests start and stop the clusters themselves (a SLURM cluster
# already running with SLURM_CONF set is used and left running).
SLURM_DIR ?= /tmp/capsnet-slurm
test-engines: install
	CAPSNET_SLURM_DIR=$(SLURM_DIR) $(PY) -m pytest -q -m engines -rP

slurm-start:
	scripts/slurm/start.sh $(SLURM_DIR)

slurm-stop:
	scripts/slurm/stop.sh $(SLURM_DIR)

test-slow: install
	$(PY) -m pytest -q -m slow

test-gpu: install
	$(PY) -m pytest -q -m gpu -rP

# Speed in one process each: capsnet's CapsNet against a plain PyTorch one (bench/throughput.py),
# then every router and the routing papers' own models (bench/routers.py -> results/bench_routers.json,
# which the routing-comparison table reads).
bench: install
	$(PY) bench/throughput.py $(ARGS)
	$(PY) bench/routers.py $(ROUTER_ARGS)

# The sweeps of Table 1 (all experiments at once: one queue for every GPU), then the table
# (results/table1.md, .csv) from what completed; what did not is listed, and the exit status says so.
# With a LAUNCHER the jobs run elsewhere, so PROFILE must be named: this machine's GPU says nothing.
reproduce-table: install
	@if [ -n "$(LAUNCHER)" ] && [ "$(origin PROFILE)" = "file" ]; then \
	  echo "reproduce-table: with LAUNCHER=$(LAUNCHER) name the profile: PROFILE=fast or PROFILE=paper" >&2; exit 2; fi
	@echo "reproduce-table: profile=$(PROFILE), experiments: $(EXPERIMENTS)"
	$(PY) -m capsnet.run.reproduce --profile $(PROFILE) --experiments $(EXPERIMENTS) \
	  $(if $(LAUNCHER),--launcher $(LAUNCHER)) --jobs-per-gpu $(JOBS_PER_GPU) $(if $(WANDB),--wandb) \
	  $(if $(DETACH),--detach) -- $(ARGS)

# The routing zoo: every router on the paper's body, × seeds, on the affNIST protocol (expanded
# MNIST, tested on it and on the affine set); then the routing-comparison table beside bench_routers.json.
reproduce-routing: install
	@if [ -n "$(LAUNCHER)" ] && [ "$(origin PROFILE)" = "file" ]; then \
	  echo "reproduce-routing: with LAUNCHER=$(LAUNCHER) name the profile: PROFILE=fast or PROFILE=paper" >&2; exit 2; fi
	$(PY) -m capsnet.run.reproduce --profile $(PROFILE) --experiments routing_zoo --out results/routing \
	  $(if $(LAUNCHER),--launcher $(LAUNCHER)) --jobs-per-gpu $(JOBS_PER_GPU) $(if $(WANDB),--wandb) \
	  $(if $(DETACH),--detach) -- $(ARGS)

# §7 CIFAR-10: the 7-member sweep, the ensemble's evaluation, then the table (results/cifar10/).
reproduce-cifar10: install
	$(PY) src/train.py experiment=cifar10 profile=$(PROFILE) \
	  $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER)) $(if $(filter ray_gpus,$(LAUNCHER)),hydra.launcher.jobs_per_gpu=$(JOBS_PER_GPU)) $(ARGS)
	$(PY) src/eval.py data=cifar10 "ckpt_path='multirun/cifar10/*/checkpoints/best.ckpt'" ensemble.profile=$(PROFILE) \
	  hydra.run.dir=multirun/cifar10/ensemble_$(PROFILE) figures=false
	$(PY) -m capsnet.reporting.table multirun/cifar10 --out results/cifar10 --profile $(PROFILE)

# results/REPORT.md: the table, learning curves and the best runs' figures, from REPORT_DIRS.
report: install
	$(PY) -m capsnet.reporting.table $(REPORT_DIRS) --out results --profile $(PROFILE) --report

clean:
	rm -rf outputs .pytest_cache
