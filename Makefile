# vrp-book: `make book` builds the whole default reproduction from the released zoo; `make test` runs the tests.
# Every target is incremental: a second `make book` with nothing changed does nothing.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:

PYTHON_SYS ?= python3
VENV := .venv
PY := $(CURDIR)/$(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONHASHSEED := 0
STAMP := .stamps
MATHJAX_VERSION := 3.2.2

PKG_SRC := $(shell find vrp_utils -name '*.py' 2>/dev/null)
DATA_SRC := $(wildcard vrp_utils/data/*.py)
NOTEBOOKS := $(wildcard notebooks/*.md)
EXECUTED := $(patsubst notebooks/%.md,book/generated/%.ipynb,$(NOTEBOOKS))
BOOK_PAGES := $(wildcard book/*.md) $(wildcard _static/*.css) _config.yml _toc.yml

BENCHMARK := data/benchmark/manifest.json
# The released zoo (committed, checked against its sha256 manifest before any step reads it); `make zoo` retrains.
ZOO := $(STAMP)/zoo-release
ZOO_RELEASE := zoo/MANIFEST.json $(shell find zoo -type f 2>/dev/null)
FEATURES := data/features/zoo-features.json
FEATURE_SRC := vrp_utils/extract/engine.py vrp_utils/extract/attention.py vrp_utils/extract/store.py vrp_utils/extract/scale.py vrp_utils/extract/placement.py \
	vrp_utils/extract/features.py vrp_utils/data/pope.py $(wildcard vrp_utils/models/adapters/*.py)
BASELINES := results/baselines.json
MATHJAX := book/mathjax_root/mathjax/tex-chtml.js
INDEX := _build/html/index.html

# System prerequisites (Python 3.11, npm; chromium for `make test`) are checked while make reads this
# file, before any step of `make book` or `make test` runs, even with -j: a missing one stops the build
# in its first second, naming it and the command that installs it (.ci/prereqs). SKIP_PREREQS=1 skips.
PREREQ_GOALS := $(filter all book test,$(or $(MAKECMDGOALS),all))
ifneq ($(PREREQ_GOALS),)
ifneq ($(SKIP_PREREQS),1)
PREREQ_FAILED := $(shell PYTHON_SYS='$(PYTHON_SYS)' bash .ci/prereqs $(if $(filter test,$(PREREQ_GOALS)),--browser) >&2 || echo failed)
ifneq ($(PREREQ_FAILED),)
$(error stopped before building anything: install the prerequisites named above)
endif
endif
endif

.PHONY: all venv data zoo features baselines readme mathjax notebooks book test test-unit verify reference clean clean-book help
all: book

help:
	@echo "make book   build the benchmark, features from the released zoo (zoo/), notebooks and the book (_build/html/index.html)"
	@echo "make zoo    retrain the zoo into data/zoo-retrain and compare it with the release (never replaces zoo/)"
	@echo "make features  extract each zoo model once over the distinct benchmark inputs"
	@echo "make test   run the whole test suite (builds what the tests read first)"
	@echo "make test-unit  fast tests only (no built data needed)"
	@echo "make verify  compare results/*.json with results/reference/ (tolerances: results/reference/tolerances.yml)"
	@echo "make reference  rewrite results/reference/ from the current results and say what changed"

venv: $(STAMP)/venv
$(STAMP)/venv: requirements.txt pyproject.toml
	@mkdir -p $(STAMP)
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

data: $(BENCHMARK)
$(BENCHMARK): $(STAMP)/venv $(DATA_SRC)
	$(PY) -m vrp_utils.data build

# Every released file against zoo/MANIFEST.json, and the release's benchmark against data/benchmark: a missing,
# changed or corrupt file stops the build here, named, with the command that restores it.
$(ZOO): $(STAMP)/venv $(BENCHMARK) $(ZOO_RELEASE) vrp_utils/models/release.py
	$(PY) -m vrp_utils.models.release check
	@touch $@

# Retraining is its own command and never part of `make book`: training is chaotic across CPU kinds. It writes
# data/zoo-retrain/ and prints its cards beside the release's (exit 1 if a model is outside the band);
# `python -m vrp_utils.models.release publish` replaces the release with it (README: "Replacing the release").
zoo: $(STAMP)/venv $(BENCHMARK)
	$(PY) -m vrp_utils.models.zoo build --jobs 3
	$(PY) -m vrp_utils.models.release compare

# Each zoo model extracted once over the distinct inputs of the three settings, side by side, then
# its sample pool for chapter 04 in the same worker (its defaults; a test checks they agree).
features: $(FEATURES)
$(FEATURES): $(STAMP)/venv $(ZOO) $(FEATURE_SRC)
	$(PY) -m vrp_utils.extract.features --jobs 3 --sample-pool 20 --temperature 0.7 --top-p 0.9 --sample-seed 0 --index $@

baselines: $(BASELINES)
$(BASELINES): $(STAMP)/venv $(BENCHMARK) $(DATA_SRC)
	$(PY) -m vrp_utils.data baselines

# The README's zoo and baseline tables are generated from the build (a test checks they match).
readme: $(ZOO) $(BASELINES)
	$(PY) -m vrp_utils.readme

mathjax: $(MATHJAX)
$(MATHJAX):
	@mkdir -p .cache/npm book/mathjax_root
	cd .cache/npm && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null
	rm -rf .cache/npm/package book/mathjax_root/mathjax
	tar -xzf .cache/npm/mathjax-$(MATHJAX_VERSION).tgz -C .cache/npm
	cp -r .cache/npm/package/es5 book/mathjax_root/mathjax
	cp .cache/npm/package/LICENSE book/mathjax_root/mathjax/LICENSE
	@touch $@

notebooks: $(EXECUTED)
book/generated/%.ipynb: notebooks/%.md $(PKG_SRC) $(BENCHMARK) $(ZOO) $(FEATURES) $(BASELINES) $(STAMP)/venv
	$(PY) -m vrp_utils.run $<

# The status page also shows the benchmarks' ratios and the last `make verify` (if it ran).
book/generated/status.md: $(EXECUTED) vrp_utils/book.py $(wildcard benchmarks/results/*.json results/verify/summary.json)
	$(PY) -m vrp_utils.book status

# Pages generated from the results (vrp_utils/pages.py): paper vs this reproduction, and the fragments the
# introduction (its findings) and the re-run page (its measured costs) include. One command writes all three.
RESULT_PAGES := book/generated/paper_vs_reproduction.md
$(RESULT_PAGES): $(EXECUTED) vrp_utils/pages.py vrp_utils/book.py book/claims.yml
	$(PY) -m vrp_utils.book pages
	@touch $@

book: $(INDEX)
$(INDEX): $(EXECUTED) book/generated/status.md $(RESULT_PAGES) $(BOOK_PAGES) $(MATHJAX) $(BASELINES) $(STAMP)/venv
	$(PY) -m vrp_utils.book build
	@touch $@

# Test worker processes (pytest-xdist). The suite is mostly Python overhead and subprocess start-up, so two
# workers on 2 cores take 121 s where one takes 197 s (776 tests); TEST_WORKERS=0 runs in one process.
# worksteal: a few tests take 10-27 s, and an idle worker takes queued tests from the busy one (164 s vs 183 s
# with xdist's default split, measured back to back on one built tree).
TEST_WORKERS ?= 2
PYTEST_XDIST = -n $(TEST_WORKERS) --dist worksteal

test: book
	$(PY) -m pytest -q $(PYTEST_XDIST) -m "not kernel_paths"

# Every notebook's numbers against the committed reference, under results/reference/tolerances.yml. Its result
# (results/verify/summary.json) goes onto the status page: where the book is built, the page is rewritten and the
# book re-rendered (a sub-make, which sees the new summary), and verify still exits with the check's status.
# Then the kernel-path check: chapter 01 re-extracted under the portable CPU kernels (ATEN_CPU_CAPABILITY=default), against the same reference
# (tests/test_kernel_paths.py, about 100 s on 2 cores with zoo v2; in `make test` it was the suite's long pole).
verify: $(EXECUTED) $(BASELINES)
	@status=0; $(PY) -m vrp_utils.verify check || status=$$?; \
	if [ -f $(INDEX) ]; then $(MAKE) --no-print-directory SKIP_PREREQS=1 book || exit $$?; fi; \
	$(PY) -m pytest -q -p no:cacheprovider -m kernel_paths tests/test_kernel_paths.py || status=$$?; exit $$status

# The only way to change the reference; re-run it (and commit results/reference/) when a chapter is
# added or a change of numbers is intended. It refuses quantities that no tolerance rule covers.
reference: $(EXECUTED) $(BASELINES)
	$(PY) -m vrp_utils.verify update

test-unit: $(STAMP)/venv
	$(PY) -m pytest -q $(PYTEST_XDIST) -m "not built"

clean-book:
	rm -rf _build book/generated runs
	find results -maxdepth 1 -name '*.json' -delete

clean: clean-book
	rm -rf data/benchmark data/zoo-retrain data/features $(STAMP)
