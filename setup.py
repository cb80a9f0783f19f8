"""Build hook: generate the fleetloop.v1 protobuf/gRPC modules from proto/v1/*.proto.

The generated *_pb2.py files are never committed or hand-edited; they are produced here at
build/install time (pip install ., pip install -e .) and written next to the .proto files.
"""
import glob
import os
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_protos() -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    src_dir = os.path.join(HERE, "proto", "v1")
    protos = sorted(glob.glob(os.path.join(src_dir, "*.proto")))
    with tempfile.TemporaryDirectory() as out:
        # Map proto/ to the virtual path fleetloop/proto so generated imports read
        # `from fleetloop.proto.v1 import episode_pb2`.
        args = ["protoc", f"-Ifleetloop/proto={os.path.join(HERE, 'proto')}", f"-I{include}",
                f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
        args += [os.path.join("fleetloop/proto/v1", os.path.basename(p)) for p in protos]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed for " + " ".join(protos))
        for f in glob.glob(os.path.join(out, "fleetloop", "proto", "v1", "*")):
            shutil.copy(f, src_dir)


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
