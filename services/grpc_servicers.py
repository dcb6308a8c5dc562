"""gRPC services registered on Ray Serve's gRPC proxy (`gRPCOptions.grpc_servicer_functions`).

Imported by the proxy and by the gateway replicas alike: tritonclient's generated OIP v2 messages say
they live in a module named `grpc_service_pb2`, so that name must resolve wherever Ray unpickles them.
"""

from __future__ import annotations

import sys

from tritonclient.grpc import service_pb2, service_pb2_grpc

sys.modules.setdefault("grpc_service_pb2", service_pb2)

try:
    from services.proto import study_pb2, study_pb2_grpc
except ImportError as exc:  # generated at install time (make venv)
    raise ImportError(f"services/proto/study_pb2*.py not generated ({exc}); run `make venv`") from None

SERVICER = "services.grpc_servicers.add_servicers"
__all__ = ["SERVICER", "add_servicers", "service_pb2", "study_pb2"]


def add_servicers(servicer, server) -> None:
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    study_pb2_grpc.add_StudyServiceServicer_to_server(servicer, server)
