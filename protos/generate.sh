#!/usr/bin/env sh
# Regenerates the checked-in Python stubs (services/rpc/drafter_pb2*.py*) from protos/drafter.proto.
# Needs grpcio-tools (a dev dependency). tests/test_services_contract.py fails when they differ.
set -eu
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m grpc_tools.protoc --proto_path=services/rpc=protos \
  --python_out=. --pyi_out=. --grpc_python_out=. protos/drafter.proto
