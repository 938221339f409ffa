"""Regenerate the committed PodResources stubs from the .proto files.

Run from anywhere: `.venv/bin/python podresources/regenerate.py`.

protoc is run with the repository root as the include path and the protos
named by their path under it, so the generated modules import each other as
`podresources.api.v1...` (no sys.path tricks) and the two API versions get
distinct file names in protobuf's global descriptor pool.
tests/pods/test_stubs.py regenerates into a temp dir and compares, so the
committed stubs cannot silently drift from the protos.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOS = (
    "podresources/api/v1/podresources.proto",
    "podresources/api/v1alpha1/podresources.proto",
)


def generated_names(proto: str) -> list[str]:
    stem = proto.removesuffix(".proto")
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs under out_dir (mirroring the repo layout); return their paths."""
    import grpc_tools  # type: ignore[import-untyped]  # dev-only dependency (grpcio-tools)
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    # The well-known types ship inside grpc_tools; include them like protoc's CLI does.
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{wkt}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return [out_dir / name for proto in PROTOS for name in generated_names(proto)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
