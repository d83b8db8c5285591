# Sourced by launch/*.sh: create/update the project's .venv idempotently.
# Re-installs only when a requirements file changed since the last install. One line per phase;
# pip's own output goes to .venv/install.log and is shown only if a phase fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
LOG="$ROOT/.venv/install.log"

_phase() {  # _phase "what" cmd...: run quietly, one line; on failure show the log's tail and stop
  local what="$1"; shift
  local t0=$SECONDS
  printf '[rice_jax] %s ... ' "$what"
  if "$@" >>"$LOG" 2>&1; then
    echo "done ($((SECONDS - t0)) s)"
  else
    local rc=$?
    echo "FAILED (exit $rc); last lines of $LOG:"
    tail -n 40 "$LOG" >&2
    return "$rc"
  fi
}

if [ ! -x .venv/bin/python ]; then
  mkdir -p .venv
  : > "$LOG"
  _phase "creating .venv with $PY" "$PY" -m venv .venv
fi
STAMP=.venv/.rice_jax_requirements.sha
WANT="$(cat requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  : > "$LOG"
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1 PYTHONWARNINGS="ignore::DeprecationWarning"
  _phase "upgrading pip" .venv/bin/python -m pip install --upgrade pip || true
  _phase "installing pinned requirements (first time: several minutes)" \
    .venv/bin/python -m pip install -r requirements-dev.txt
  _phase "installing packages without their declared dependencies (requirements-nodeps.txt)" \
    .venv/bin/python -m pip install --no-deps -r requirements-nodeps.txt
  if .venv/bin/python -m pip show opencv-python >/dev/null 2>&1; then
    echo "[rice_jax] opencv-python (GUI build) is installed next to opencv-python-headless; remove it:" \
         ".venv/bin/pip uninstall -y opencv-python && .venv/bin/pip install --force-reinstall" \
         "opencv-python-headless==5.0.0.93" >&2
    exit 1
  fi
  _phase "installing rice_jax (editable)" .venv/bin/python -m pip install --no-deps -e .
  echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
