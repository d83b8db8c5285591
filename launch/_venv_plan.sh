# Sourced by launch/plan.sh and launch/test.sh: create/update .venv-plan idempotently (the planner's
# environment: jax[tpu] with libtpu, and only what building the train step imports).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
PLOG="$ROOT/.venv-plan/install.log"
STAMP="$ROOT/.venv-plan/.rice_jax_requirements.sha"
WANT="$(cat "$ROOT/requirements-plan.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  mkdir -p "$ROOT/.venv-plan"
  : > "$PLOG"
  printf '[rice_jax] creating .venv-plan (jax[tpu] + libtpu for ahead-of-time TPU compiles) ... '
  t0=$SECONDS
  if { [ -x "$ROOT/.venv-plan/bin/python" ] || "$PY" -m venv "$ROOT/.venv-plan"; } >>"$PLOG" 2>&1 \
     && PIP_DISABLE_PIP_VERSION_CHECK=1 "$ROOT/.venv-plan/bin/python" -m pip install -r "$ROOT/requirements-plan.txt" >>"$PLOG" 2>&1 \
     && PIP_DISABLE_PIP_VERSION_CHECK=1 "$ROOT/.venv-plan/bin/python" -m pip install --no-deps -e "$ROOT" >>"$PLOG" 2>&1; then
    echo "done ($((SECONDS - t0)) s)"
    echo "$WANT" > "$STAMP"
  else
    echo "FAILED; last lines of $PLOG:"
    tail -n 30 "$PLOG" >&2
    return 1 2>/dev/null || exit 1
  fi
fi
