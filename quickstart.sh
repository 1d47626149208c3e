#!/usr/bin/env bash
# One command from a fresh machine to the demo or the tests:
#   bash quickstart.sh demo [fssam demo flags]   sets everything up, then runs `fssam demo`
#   bash quickstart.sh test [pytest flags]       sets everything up, then runs the whole test suite: in the main
#                                                environment, then the live-server tests (`-m pytriton`) in the
#                                                serving environment ./.venv-serve (PyTriton needs numpy<2)
#   bash quickstart.sh test-serve [pytest flags] only the second part
# It installs into the active virtual environment if one is active, else into ./.venv (made here), and only
# what is missing: a stamp records what install.sh last installed, so a second run starts at once.
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-}"
case "$what" in
  demo|test|test-serve) shift ;;
  *) echo "usage: bash quickstart.sh demo|test|test-serve [flags passed to fssam demo / pytest]" >&2; exit 2 ;;
esac

# ensure_env EXTRAS: install.sh's EXTRAS into the active environment unless its stamp says they are there
ensure_env() {
  local stamp="$VIRTUAL_ENV/.fssam-deploy-installed"
  local want
  want="$(cat install.sh pyproject.toml | sha256sum | cut -d' ' -f1) $(pwd) $1"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import fssam_deploy, sam2, torch" 2>/dev/null; then
    EXTRAS="$1" bash install.sh
    echo "$want" > "$stamp"
  fi
}

# the serving environment: its own venv, the `serve-dev` extras (numpy<2), the tests marked `pytriton`
serve_tests() {
  local venv="${FSSAM_SERVE_VENV:-.venv-serve}"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  (
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    ensure_env serve-dev
    rc=0
    python -m pytest -m pytriton tests/serve "$@" || rc=$?
    [ "$rc" -eq 5 ] && rc=0  # flags that select no live-server test
    exit "$rc"
  )
}

if [ "$what" = test-serve ]; then
  unset VIRTUAL_ENV
  serve_tests "$@"
  exit
fi
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
ensure_env dev
if [ "$what" = demo ]; then
  exec fssam demo "$@"
fi
rc=0
python -m pytest "$@" || rc=$?
deactivate 2>/dev/null || true
unset VIRTUAL_ENV
serve_rc=0
serve_tests "$@" || serve_rc=$?
echo "quickstart: main suite exit $rc, live-server suite (.venv-serve) exit $serve_rc"
[ "$rc" -eq 0 ] && [ "$serve_rc" -eq 0 ]
