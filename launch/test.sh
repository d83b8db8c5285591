#!/usr/bin/env bash
# Create/update .venv and run the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k loss -x`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# The planner's environment (jax[tpu]); tests/test_plan.py runs `rice_jax.preflight.plan` in it.
source "$(dirname "${BASH_SOURCE[0]}")/_venv_plan.sh"
export RICE_JAX_PLAN_PYTHON="$ROOT/.venv-plan/bin/python"
set +e
# RICE_JAX_TEST_WORKERS=0 runs in this one process (the plain pytest way, e.g. for --pdb).
python -m pytest -n "${RICE_JAX_TEST_WORKERS:-2}" --dist worksteal "$@"
rc=$?
# Exit code 5 means "no tests collected": not a failure of the suite.
if [ "$rc" -eq 5 ]; then rc=0; fi
exit "$rc"
