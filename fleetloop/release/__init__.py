"""How a policy version reaches a robot: the registry publishes and steers versions
(registry.py), signs them (signing.py), the rollout gate promotes or refuses them (rollout.py),
and the robot turns the published weights into a running policy (runtime.py). The models
themselves live in fleetloop.policy."""
