"""fleetloop's wire contract. The .proto sources live in proto/v1/; the Python modules next to
them (*_pb2.py, *_pb2_grpc.py) are generated at install time by setup.py."""
