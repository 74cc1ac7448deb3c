"""Regenerate fedpriv/v1 from proto/fedpriv/v1/*.proto (run as `make proto`).

The output path equals the .proto path, so the generated imports
(`from fedpriv.v1 import tensor_pb2`) need no rewriting.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = "fedpriv/v1"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc over every .proto of the package into `out_dir`.

    Args:
        out_dir: Root under which `fedpriv/v1/*_pb2*.py[i]` are written.

    Returns:
        The generated files, sorted.
    """
    from grpc_tools import protoc  # dev-only dependency

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return sorted(p for p in (out_dir / PACKAGE).iterdir() if p.name.endswith((".py", ".pyi")))


if __name__ == "__main__":
    written = generate(ROOT)
    print("\n".join(str(p.relative_to(ROOT)) for p in written))
    sys.exit(0)
