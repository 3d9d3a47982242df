# Sourced by ops/test and ops/demo: cd to the repo, make sure .venv has the project installed.
# Needs only python3 (>= 3.11; set PYTHON=/path/to/python to pick another).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"

if [[ ! -x "$VENV/bin/python" ]]; then
  PYTHON="${PYTHON:-python3}"
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: $PYTHON is $("$PYTHON" --version 2>&1); this project needs Python >= 3.11 (set PYTHON=...)" >&2
    exit 1
  fi
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when pyproject.toml changed (the install is editable, so code changes need nothing).
pyproject_sha="$("$VENV/bin/python" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest()[:16])')"
stamp="$VENV/.installed-$pyproject_sha"
if [[ ! -e "$stamp" ]]; then
  echo "==> installing the project and dev tools into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"

# The browser tests (tests/browser) drive Debian's Chromium through Playwright; install it once.
if [[ ! -x /usr/bin/chromium ]] && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  echo "==> installing chromium (for the browser tests)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "warning: could not install chromium; the browser tests will fail" >&2
fi
