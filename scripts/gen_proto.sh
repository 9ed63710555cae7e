#!/usr/bin/env bash
# Regenerate the Python modules of the wire contract from proto/ms_rpc/v1/*.proto.
# Usage: scripts/gen_proto.sh [PYTHON]   (PYTHON must have grpcio-tools; default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
"$PY" -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/ms_rpc/v1/worker.proto
