"""The .proto files load from the repository for every language (issue 11, item 4): one include
path (`-I proto`, docs/robot-link.md), imports that resolve under it, and the commands a Python,
C++ or Java user would run, from the repository root."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def repo_protos() -> list[str]:
    """Every .proto in the repository (tracked or not), relative to the root."""
    found = []
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("node_modules", "build", "dist", "runs")]
        found += [os.path.relpath(os.path.join(d, f), ROOT) for f in files if f.endswith(".proto")]
    return sorted(found)


def test_every_proto_lives_under_the_include_path_at_its_package_path():
    protos = repo_protos()
    assert protos, "no .proto files found"
    for p in protos:
        assert p.startswith("proto/fleetloop/v1/"), p
        text = (ROOT / p).read_text()
        assert "package fleetloop.v1;" in text
        for line in text.splitlines():
            if line.startswith("import "):
                target = line.split('"')[1]
                assert (ROOT / "proto" / target).is_file(), f"{p}: {line} does not resolve under proto/"


def test_grpc_tools_compiles_every_proto_from_the_repository_root(tmp_path):
    """The issue's command: python -m grpc_tools.protoc -I proto --python_out --grpc_python_out."""
    import importlib.util
    assert importlib.util.find_spec("grpc_tools") is not None, \
        "grpcio-tools is not installed in this environment (it belongs to fleetloop's test extra)"
    out = tmp_path / "py"
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--python_out={out}",
                        f"--grpc_python_out={out}", *repo_protos()], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "fleetloop" / "v1" / "robot_link_pb2_grpc.py").is_file()
    # what that standalone output is for: a client outside fleetloop's package works with it
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from fleetloop.v1 import robot_link_pb2 as rl, robot_link_pb2_grpc as g; "
            "assert 'GetSpec' in rl.DESCRIPTOR.services_by_name['RobotLink'].methods_by_name; "
            "assert hasattr(g, 'RobotLinkStub'); print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.skipif(shutil.which("protoc") is None,
                    reason="plain protoc is not installed (Debian: apt-get install protobuf-compiler)")
@pytest.mark.parametrize("lang", ["cpp", "java", "python"])
def test_plain_protoc_compiles_every_proto_outside_python(tmp_path, lang):
    r = subprocess.run(["protoc", "-I", "proto", f"--{lang}_out={tmp_path}", *repo_protos()], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert any(tmp_path.rglob("*")), "protoc wrote nothing"


@pytest.mark.skipif(shutil.which("protoc") is None,
                    reason="plain protoc is not installed (Debian: apt-get install protobuf-compiler)")
def test_descriptor_set_for_reflection_based_clients(tmp_path):
    """Node's proto-loader, grpcurl and Rust's prost-build read the same files; a descriptor set
    with imports is the portable form of all of them."""
    out = tmp_path / "fleetloop.pb"
    r = subprocess.run(["protoc", "-I", "proto", "--include_imports", f"--descriptor_set_out={out}",
                        *repo_protos()], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from google.protobuf import descriptor_pb2
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert sorted(f.name for f in fds.file) == ["fleetloop/v1/episode.proto", "fleetloop/v1/policy.proto",
                                               "fleetloop/v1/robot_link.proto"]


def test_installed_python_modules_are_the_repository_protos():
    """`pip install -e .` generates fleetloop.proto.v1 from proto/fleetloop/v1 (setup.py): the
    modules carry the same file names and services."""
    from fleetloop.proto.v1 import episode_pb2, robot_link_pb2
    assert robot_link_pb2.DESCRIPTOR.name == "fleetloop/v1/robot_link.proto"
    assert episode_pb2.DESCRIPTOR.name == "fleetloop/v1/episode.proto"
    assert "GetSpec" in robot_link_pb2.DESCRIPTOR.services_by_name["RobotLink"].methods_by_name
    src = (ROOT / "proto/fleetloop/v1/robot_link.proto").read_text()
    for name in robot_link_pb2.DESCRIPTOR.message_types_by_name:
        assert f"message {name} " in src
