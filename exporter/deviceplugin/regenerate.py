"""Regenerate the committed device plugin gRPC stubs from the .proto.

    .venv/bin/python -m exporter.deviceplugin.regenerate

The stubs are committed so that the runtime image needs no protoc. The proto is
compiled with the repository root as include path, so the descriptor is named
`exporter/deviceplugin/api/v1beta1/deviceplugin.proto` (distinct from the
PodResources proto in protobuf's default pool) and the generated `_pb2_grpc`
imports its `_pb2` by absolute package path.

tests/deviceplugin/test_stubs.py calls `generate()` into a temp dir and fails
when the committed files differ: edit the proto, run this, commit all four files.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("exporter/deviceplugin/api/v1beta1/deviceplugin.proto")
GENERATED = (
    PROTO.with_name("deviceplugin_pb2.py"),
    PROTO.with_name("deviceplugin_pb2.pyi"),
    PROTO.with_name("deviceplugin_pb2_grpc.py"),
)


def generate(out_root: Path) -> list[Path]:
    """Compile the proto into `out_root` (mirroring the repository layout); return the files written."""
    # Imported here so the runtime (which never regenerates) does not need grpcio-tools.
    from grpc_tools import protoc  # type: ignore[import-untyped]

    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(REPO_ROOT / PROTO),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} for {PROTO}")
    return [out_root / rel for rel in GENERATED]


def main() -> int:
    for path in generate(REPO_ROOT):
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
