"""Generated fleetloop.v1 modules: episode_pb2, policy_pb2, robot_link_pb2, robot_link_pb2_grpc."""
SCHEMA_VERSION = 1
