#!/usr/bin/env bash
# The local stack (Ray head, moto S3, MLflow on 127.0.0.1): infra/local/stack.sh up|status|env|down
# A thin wrapper around stack.py, run with the project's venv Python (or $FRACTALGEN_PYTHON).
# Examples:
#   infra/local/stack.sh up                 # start, wait until healthy, print the endpoints
#   eval "$(infra/local/stack.sh env)"      # point ray / mlflow / boto3 clients at it
#   infra/local/stack.sh down               # stop everything it started
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${FRACTALGEN_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi
exec "$python" "$here/stack.py" "$@"
