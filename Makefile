# bnp: run `make help` for the list of targets. fig-<setting> targets pass ARGS to the experiment,
# e.g. make fig-cnn-fc-b1-1ep ARGS=--restore (finish a committed sweep, bnp/archive.py).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export WANDB_ERROR_REPORTING ?= false

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(wildcard $(CONSTRAINTS))
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_CONSTRAINTS) -e '.[experiments,dev]'
	touch $@

setup: $(STAMP) ## create .venv and install bnp (editable) with the experiments and dev extras; instant when nothing changed

test: setup ## run the fast test suite
	$(PY) -m pytest -q -m "not slow"

test-all: setup ## run every test, including those marked slow
	$(PY) -m pytest -q

bench: setup ## step time of each norm vs plain SGD (MLP, CNN, ResNet-20; batch 1/8/128) -> results/bench/
	$(PY) benchmarks/bench_step.py --seconds 3 --out results/bench
	$(PY) benchmarks/bench_step.py --seconds 3 --models mlp --threads 1 --out results/bench
	$(PY) benchmarks/bench_overhead.py --out results/bench
	$(PY) benchmarks/bench_overhead.py --batch-size 128 --rounds 30 --out results/bench

run: setup ## quickstart: MLP on digits, norm x batch size, 3 lrs each, bracketed -> results/quickstart/
	$(PY) -m bnp.setting quickstart $(ARGS)

report: setup ## tables + figures of a sweep: make report SWEEP=outputs/sweeps/NAME [OUT=dir]
	@test -n "$(SWEEP)" || (echo "usage: make report SWEEP=outputs/sweeps/NAME [OUT=dir]" && exit 2)
	$(PY) -m bnp.report $(SWEEP) $(if $(OUT),--out $(OUT),)

# One target per setting directory in results/ (results/README.md groups them by claim): each runs
# `python -m bnp.setting <setting>`, which finds the experiment file that declares the setting (its
# SETTINGS) and runs it with that setting's arguments. ARGS=--restore finishes a committed sweep.
SETTING_RUN := $(PY) -m bnp.setting
fig-digits-mlp-defaults: setup ## the defaults learn: every norm x batch 1/16/128 at default lrs, digits
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-digits-mlp-bnp-b1-lr: setup ## why BNP's default lr is 0.01: batch 1 at higher lrs, with warmup or a larger eps, digits
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-mlp-b1-128-2ep: setup ## claims 1-3: MLP on Fashion-MNIST, norms x batch sizes 1..128, 2 epochs
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-mlp-b1-1ep: setup ## claim 3: online learning (batch 1), MLP
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-cnn-gap-b1-1ep: setup ## claim 3: online learning (batch 1), GAP-head CNN
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-cnn-fc-b1-1ep: setup ## claims 3-4: online learning (batch 1), fc-head CNN
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-cnn-gap-b128-2ep: setup ## claim 4: GAP-head CNN, batch 128, 2 epochs, plain SGD
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-cnn-gap-b8-1ep: setup ## claim 4: GAP-head CNN, batch 8, 1 epoch
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-cnn-fc-b128-2ep: setup ## claim 4: fc-head CNN, batch 128, 2 epochs
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-cnn-fc-b8-1ep: setup ## claim 4: fc-head CNN, batch 8, 1 epoch
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-cnn-classic-b128-1ep: setup ## claim 4: classic 32-64-128 CNN with an fc head, batch 128, 1 epoch
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-cnn-gap-b32-2ep: setup ## claim 4, why BNP lags on the GAP CNN: BNP's variants vs BN, batch 32, instruments on
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-cnn-gap-b128-6ep-momentum: setup ## claim 4 at a longer budget: GAP CNN, momentum + cosine, 6 epochs, with clipping and trust-ratio variants
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-resnet20-b128-2ep: setup ## claim 4: ResNet-20, batch 128, 2 epochs: BN, GN, BNP, BNP+clipping, clipping, trust ratio
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-resnet20-b8-2ep: setup ## claim 4: ResNet-20, batch 8, 2 epochs
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-resnet20-b128-6ep: setup ## claim 4's fix at 3x the budget: BN, GN, BNP+clipping, every lr over 3 seeds
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-resnet20proj-b128-2ep: setup ## claim 4's fix on projection-shortcut ResNet-20: BN, GN, BNP, BNP+clipping
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-resnet: setup ## ResNet-20 on Fashion-MNIST at the GPU-sized budget -> results/resnet
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

fig-preconditioners: setup ## beyond the paper: BNP among the preconditioners (SGD/Adam +- BNP, full covariance, Shampoo, SOAP, Muon, Kron), MLP batch 1/8/128 + CNN -> results/preconditioners
	$(SETTING_RUN) $(@:fig-%=%) $(ARGS)

bench-optimizers: setup ## step time of each preconditioners method vs plain SGD -> results/bench/optimizers-<device>.md
	$(PY) benchmarks/bench_optimizers.py --out results/bench

fig-hessian: setup ## claim 5: Hessian condition numbers, none vs bnp, digits + Fashion-MNIST -> results/hessian
	$(PY) experiments/hessian.py $(ARGS)

reproduce: fig-digits-mlp-defaults fig-digits-mlp-bnp-b1-lr fig-mlp-b1-128-2ep fig-mlp-b1-1ep fig-cnn-gap-b1-1ep fig-cnn-fc-b1-1ep fig-cnn-gap-b128-2ep fig-cnn-gap-b8-1ep fig-cnn-fc-b128-2ep fig-cnn-fc-b8-1ep fig-cnn-classic-b128-1ep fig-cnn-gap-b32-2ep fig-cnn-gap-b128-6ep-momentum fig-resnet20-b128-2ep fig-resnet20-b8-2ep fig-resnet20-b128-6ep fig-resnet20proj-b128-2ep fig-preconditioners fig-hessian ## every paper-claim experiment

smoke: setup ## every experiment's tiny offline variant (about a minute each)
	for e in experiments/*.py; do $(PY) $$e --smoke || exit 1; done

table: setup ## a setting's committed table from its archive alone: make table SETTING=resnet20-b128-2ep (what a fresh clone gets)
	@test -n "$(SETTING)" || (echo "usage: make table SETTING=<a directory of results/>" && exit 2)
	rm -rf outputs/archived/$(SETTING)
	$(PY) -m bnp.archive restore results/$(SETTING)/sweep.tar.gz outputs/archived/$(SETTING)
	$(PY) -m bnp.report outputs/archived/$(SETTING) --out results/$(SETTING) --target $$(t=$$(grep -m1 -o -- '--target [0-9.]*' results/$(SETTING)/PROVENANCE.md | cut -d' ' -f2); echo $${t:-0.9})

docs: setup ## render the numbers in README.md and docs/ from results/*/table.csv (docs/templates/)
	$(PY) -m bnp.docs

sync: ## upload offline W&B runs under outputs/ (needs network and `wandb login`)
	find outputs -type d -name 'offline-run-*' -exec $(VENV)/bin/wandb sync {} +

clean: ## remove caches (keeps .venv and results)
	rm -rf .pytest_cache && find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +

.PHONY: help setup test test-all bench run report table docs sync clean fig-digits-mlp-defaults fig-digits-mlp-bnp-b1-lr fig-mlp-b1-128-2ep fig-mlp-b1-1ep fig-cnn-gap-b1-1ep fig-cnn-fc-b1-1ep fig-cnn-gap-b128-2ep fig-cnn-gap-b8-1ep fig-cnn-fc-b128-2ep fig-cnn-fc-b8-1ep fig-cnn-classic-b128-1ep fig-cnn-gap-b32-2ep fig-cnn-gap-b128-6ep-momentum fig-resnet20-b128-2ep fig-resnet20-b8-2ep fig-resnet20-b128-6ep fig-resnet20proj-b128-2ep fig-resnet fig-preconditioners bench-optimizers fig-hessian reproduce smoke
