"""Build hook: generate the fleetloop.v1 protobuf/gRPC Python modules.

The .proto sources live in proto/fleetloop/v1/ and import each other as "fleetloop/v1/...", so
any language's protoc works from the repository with one include path:

    protoc -I proto --<lang>_out=OUT proto/fleetloop/v1/*.proto

Python is the one exception to "the import path is the module path": the generated modules
belong to the installed package `fleetloop.proto.v1` (the repository's proto/v1/, a package of
generated files only), so the imports protoc writes (`from fleetloop.v1 import episode_pb2`) are
rewritten to `from fleetloop.proto.v1 import ...`. The generated *_pb2.py files are never
committed or hand-edited; they are produced here at build/install time (pip install .,
pip install -e .).
"""
import glob
import os
import re
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "proto")                 # the include path (-I proto)
PROTO_SRC = os.path.join(PROTO_ROOT, "fleetloop", "v1")  # the sources: package fleetloop.v1
PY_OUT = os.path.join(PROTO_ROOT, "v1")                  # the Python package fleetloop.proto.v1

_IMPORT = re.compile(r"^(from |import )fleetloop\.v1\b", re.M)


def generate_protos() -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = sorted(glob.glob(os.path.join(PROTO_SRC, "*.proto")))
    if not protos:
        raise RuntimeError(f"no .proto files in {PROTO_SRC}")
    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}",
                f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
        args += [os.path.relpath(p, PROTO_ROOT) for p in protos]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed for " + " ".join(protos))
        for f in glob.glob(os.path.join(out, "fleetloop", "v1", "*.py*")):
            with open(f, encoding="utf-8") as fh:
                text = _IMPORT.sub(lambda m: m.group(1) + "fleetloop.proto.v1", fh.read())
            with open(os.path.join(PY_OUT, os.path.basename(f)), "w", encoding="utf-8") as fh:
                fh.write(text)


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
