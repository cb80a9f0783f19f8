"""fleetloop's wire contract. The .proto sources live in proto/fleetloop/v1/ (package fleetloop.v1,
include path `proto`); the Python modules in proto/v1/ (*_pb2.py, *_pb2_grpc.py, imported as
fleetloop.proto.v1) are generated at install time by setup.py."""
