#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (slow: NOT run in CI or by `make test`).
#
#   benchmarks/mutation.sh [--survivors] [pope|stats|concentration|store|attention ...]   (default: all five)
#
# --survivors reruns only the mutants of the module that survived (or were not run) last time, by
# name: the quick check after adding tests (results of killed mutants are kept in mutants/).
#
# mutmut's settings are in pyproject.toml [tool.mutmut]: it copies vrp_utils/ and tests/ into
# mutants/ (git-ignored, also its cache: delete it to start over), mutates only the five modules,
# and for each mutant runs the tests of the six selected test files that call the mutated
# function. The hypothesis tests run with the "mutation" profile (fewer examples per mutant).
# Each module's score and its surviving mutants (with diffs) are printed by
# benchmarks/mutation_report.py and written to benchmarks/results/mutation_<module>.txt.
#
# Environment: PYTHON (default: python), JOBS (mutmut --max-children, default 2), NICE (default 19).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
JOBS=${JOBS:-2}
NICE=${NICE:-19}
export VRP_HYPOTHESIS_PROFILE=mutation

declare -A GLOB=(
  [pope]="vrp_utils.data.pope.*"
  [stats]="vrp_utils.analysis.stats.*"
  [concentration]="vrp_utils.analysis.concentration.*"
  [store]="vrp_utils.extract.store.*"
  [attention]="vrp_utils.extract.attention.*"
)
survivors=0
if [ "${1:-}" = "--survivors" ]; then survivors=1; shift; fi
modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=(pope stats concentration store attention)
mkdir -p benchmarks/results
for module in "${modules[@]}"; do
  glob=${GLOB[$module]:?unknown module $module (pope stats concentration store attention)}
  targets=("$glob")
  if [ "$survivors" = 1 ]; then
    mapfile -t targets < <("$PYTHON" benchmarks/mutation_report.py "$module" --names)
    [ ${#targets[@]} -eq 0 ] && { echo "== $module: no survivors"; continue; }
  fi
  echo "== $module: mutmut run ${#targets[@]} target(s): ${targets[0]} ..."
  start=$(date +%s)
  nice -n "$NICE" "$PYTHON" -m mutmut run --max-children "$JOBS" "${targets[@]}" || true  # survivors exit non-zero
  echo "   ($(( $(date +%s) - start )) s)"
  nice -n "$NICE" "$PYTHON" benchmarks/mutation_report.py "$module" | tee "benchmarks/results/mutation_$module.txt"
done
