#!/usr/bin/env bash
# One command from a fresh machine to the demo or the tests:
#   bash quickstart.sh demo [fssam demo flags]   sets everything up, then runs `fssam demo`
#   bash quickstart.sh test [pytest flags]       sets everything up, then runs the test suite
# It installs into the active virtual environment if one is active, else into ./.venv (made here), and only
# what is missing: a stamp records what install.sh last installed, so a second run starts at once.
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-}"
case "$what" in
  demo|test) shift ;;
  *) echo "usage: bash quickstart.sh demo|test [flags passed to fssam demo / pytest]" >&2; exit 2 ;;
esac
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
stamp="$VIRTUAL_ENV/.fssam-deploy-installed"
want="$(cat install.sh pyproject.toml | sha256sum | cut -d' ' -f1) $(pwd)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import fssam_deploy, sam2, torch" 2>/dev/null; then
  bash install.sh
  echo "$want" > "$stamp"
fi
if [ "$what" = demo ]; then
  exec fssam demo "$@"
fi
exec python -m pytest "$@"
