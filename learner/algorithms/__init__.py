"""Learner algorithms (plug-ins). Importing this package registers the built-in ones; add a
new algorithm as one module here plus one import line below."""
from fleetloop.learner.algorithms.base import ALGORITHMS, Algorithm, make_algorithm, register  # noqa: F401
from fleetloop.learner.algorithms import hg_dagger, recap  # noqa: F401  (registration)

__all__ = ["ALGORITHMS", "Algorithm", "make_algorithm", "register"]
