# bnp: run `make help` for the list of targets. fig-* targets pass ARGS to their experiment file,
# e.g. make fig-online-fc ARGS=--restore (finish a committed sweep, bnp/archive.py).
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

run: setup ## quickstart: MLP on digits, norm x batch size x lr sweep -> results/quickstart/
	$(PY) -m bnp.train -m experiment=quickstart launcher=local
	$(PY) -m bnp.sweep outputs/sweeps/quickstart
	$(PY) -m bnp.report outputs/sweeps/quickstart --out results/quickstart

report: setup ## tables + figures of a sweep: make report SWEEP=outputs/sweeps/NAME [OUT=dir]
	@test -n "$(SWEEP)" || (echo "usage: make report SWEEP=outputs/sweeps/NAME [OUT=dir]" && exit 2)
	$(PY) -m bnp.report $(SWEEP) $(if $(OUT),--out $(OUT),)

fig-defaults: setup ## the defaults learn: every norm x batch size 1/16/128 at default settings, digits -> results/defaults
	$(PY) experiments/defaults.py $(ARGS)

fig-mlp-batch-size: setup ## claims 1-3: MLP on Fashion-MNIST, norms x batch sizes 1..128 -> results/mlp_batch_size
	$(PY) experiments/mlp_batch_size.py $(ARGS)

fig-online: setup ## claim 3: online learning (batch size 1), MLP and CNN -> results/online
	$(PY) experiments/online.py $(ARGS)

fig-online-fc: setup ## claims 3-4: online learning (batch size 1) with the fc-head CNN, 3 seeds -> results/online_fc
	$(PY) experiments/online.py --suffix fc --grids 2 model.head=fc $(ARGS)

fig-cnn: setup ## claim 4: CNN on Fashion-MNIST, GAP and fc heads, batch 128 and 8 -> results/cnn
	$(PY) experiments/cnn.py $(ARGS)

fig-cnn-fc: setup ## claim 4 with the fc head (16-16-32-32) at batch 128 and 8, one seed (the CPU run) -> results/cnn_fc
	$(PY) experiments/cnn.py --suffix fc --grids 1,2 model.head=fc train.seed=0 $(ARGS)

fig-bnp-variants: setup ## claim 4, why BNP lags BN on the GAP CNN: BNP's variants vs BN, instruments on -> results/bnp_variants
	$(PY) experiments/bnp_variants.py $(ARGS)

fig-cnn-momentum: setup ## claim 4 at a longer budget: CNN, SGD momentum 0.9, cosine, 6 epochs -> results/cnn_momentum
	$(PY) experiments/cnn_momentum.py $(ARGS)

fig-cnn-classic: setup ## claim 4 on a classic 32-64-128 CNN with an fc head: none/bn/bnp, BNP momentum 0.01, one seed -> results/cnn_classic
	$(PY) experiments/cnn_classic.py $(ARGS)

fig-cnn-momentum-variants: setup ## claim 4's momentum target: BN vs BNP, BNP+clipping and clipping alone, one seed -> results/cnn_momentum_variants
	$(PY) experiments/cnn_momentum_variants.py --bracket-cap 2 $(ARGS)

fig-resnet: setup ## claim 4: ResNet-20 on Fashion-MNIST (GPU-sized) -> results/resnet
	$(PY) experiments/resnet.py $(ARGS)

fig-resnet-variants: setup ## claim 4's ResNet target: BN, GN, BNP, BNP+clipping, clipping alone; batch 128 and 8, 3 seeds (GPU-sized) -> results/resnet_variants
	$(PY) experiments/resnet_variants.py $(ARGS)

fig-preconditioners: setup ## beyond the paper: BNP among the preconditioners (SGD/Adam +- BNP, full covariance, Shampoo, SOAP, Muon, Kron), MLP batch 1/8/128 + CNN -> results/preconditioners
	$(PY) experiments/preconditioners.py $(ARGS)

bench-optimizers: setup ## step time of each preconditioners method vs plain SGD -> results/bench/optimizers-<device>.md
	$(PY) benchmarks/bench_optimizers.py --out results/bench

fig-hessian: setup ## claim 5: Hessian condition numbers, none vs bnp, digits + Fashion-MNIST -> results/hessian
	$(PY) experiments/hessian.py $(ARGS)

reproduce: fig-defaults fig-mlp-batch-size fig-online fig-online-fc fig-cnn fig-cnn-classic fig-cnn-momentum fig-cnn-momentum-variants fig-bnp-variants fig-resnet fig-resnet-variants fig-preconditioners fig-hessian ## every paper-claim experiment

smoke: setup ## every experiment's tiny offline variant (about a minute each)
	for e in defaults mlp_batch_size online cnn cnn_classic cnn_momentum cnn_momentum_variants bnp_variants resnet resnet_variants preconditioners hessian; do $(PY) experiments/$$e.py --smoke || exit 1; done

sync: ## upload offline W&B runs under outputs/ (needs network and `wandb login`)
	find outputs -type d -name 'offline-run-*' -exec $(VENV)/bin/wandb sync {} +

clean: ## remove caches (keeps .venv and results)
	rm -rf .pytest_cache && find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +

.PHONY: help setup test test-all bench run report sync clean fig-defaults fig-mlp-batch-size fig-online fig-online-fc fig-cnn fig-cnn-fc fig-cnn-classic fig-bnp-variants fig-cnn-momentum fig-cnn-momentum-variants fig-resnet fig-resnet-variants fig-preconditioners bench-optimizers fig-hessian reproduce smoke
