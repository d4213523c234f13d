#!/usr/bin/env bash
# Regenerates the Python stubs of src/aviato/v1/*.proto (committed, so installs need no protoc).
set -euo pipefail
cd "$(dirname "$0")/../src"
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. aviato/v1/*.proto
