"""Regenerate the Python code for protos/taskloom/v1/*.proto.

Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py(i) beside each .proto, with
grpcio-tools and mypy-protobuf (both pinned in pyproject.toml so the output
does not drift). With --check, writes into a temporary folder instead and
fails if anything differs from what is committed.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = PROTO_ROOT / "taskloom" / "v1"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE.glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(base: Path) -> list[Path]:
    return sorted(p for p in (base / "taskloom" / "v1").iterdir() if p.name.endswith(GENERATED))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    check = parser.parse_args().check
    if not check:
        for stale in generated_files(PROTO_ROOT):
            stale.unlink()
        generate(PROTO_ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "taskloom" / "v1").mkdir(parents=True)
        generate(out)
        fresh = {p.name for p in generated_files(out)}
        committed = {p.name for p in generated_files(PROTO_ROOT)}
        stale = sorted(fresh ^ committed) + sorted(
            name
            for name in fresh & committed
            if not filecmp.cmp(out / "taskloom" / "v1" / name, PACKAGE / name, shallow=False)
        )
        if stale:
            print("generated protobuf code is stale; run `make protos`:", *stale, sep="\n  ")
            return 1
        shutil.rmtree(out / "taskloom")
    print("generated protobuf code is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
