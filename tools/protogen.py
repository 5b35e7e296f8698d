"""Generate the Python contracts in ``tamiyo/v1/`` from ``protos/tamiyo/v1/*.proto``.

The ``.proto`` files are the single source of truth; the generated ``*_pb2.py``,
``*_pb2_grpc.py`` and their ``.pyi`` stubs are committed so that the package imports
right after ``pip install`` without a code generator. ``--check`` regenerates into a
temporary directory and fails if anything differs, which is how tests and CI prove the
committed code is fresh.

Usage::

    python tools/protogen.py          # regenerate in place
    python tools/protogen.py --check  # exit 1 and list stale files if out of date
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("tamiyo") / "v1"
GENERATED_GLOBS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) with the python, grpc and mypy plugins into out_dir."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    include = Path(protoc.__file__).parent / "_proto"  # well-known types
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins live beside python
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(
        p.relative_to(out_dir) for g in GENERATED_GLOBS for p in (out_dir / PACKAGE_DIR).glob(g)
    )


def committed() -> list[Path]:
    return sorted(
        p.relative_to(ROOT) for g in GENERATED_GLOBS for p in (ROOT / PACKAGE_DIR).glob(g)
    )


def stale_files() -> list[str]:
    """Files that differ between a fresh generation and the working tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        problems = [f"missing or extra: {p}" for p in sorted(set(fresh) ^ set(committed()))]
        problems += [
            f"stale: {p}"
            for p in fresh
            if (ROOT / p).exists() and not filecmp.cmp(Path(tmp) / p, ROOT / p, shallow=False)
        ]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    if args.check:
        problems = stale_files()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("generated contracts are stale: run `make protos`", file=sys.stderr)
            return 1
        print("generated contracts are fresh")
        return 0
    for old in committed():
        (ROOT / old).unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for rel in generate(Path(tmp)):
            shutil.copyfile(Path(tmp) / rel, ROOT / rel)
            print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
