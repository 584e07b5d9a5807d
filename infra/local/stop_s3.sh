#!/usr/bin/env bash
# Stop the loopback S3 server started by start_s3.sh (its data is gone with it).
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/local_stack.py" s3 stop
