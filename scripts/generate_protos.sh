#!/usr/bin/env bash
# Regenerates the Python stubs of the protos (committed, so installs need no protoc):
# src/aviato/v1/*.proto (the public API) and src/aviato/node/v1/*.proto (the cluster's node
# protocol, docs/internals/parts/cluster.md).
set -euo pipefail
cd "$(dirname "$0")/../src"
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. aviato/v1/*.proto
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. aviato/node/v1/*.proto
