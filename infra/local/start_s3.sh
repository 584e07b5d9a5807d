#!/usr/bin/env bash
# Start the loopback S3 server (moto, 127.0.0.1, free port) and create a bucket (default: longctx-dev).
#   infra/local/start_s3.sh [BUCKET]      then: eval "$(python infra/local/local_stack.py env)"
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/local_stack.py" s3 start --bucket "${1:-longctx-dev}"
