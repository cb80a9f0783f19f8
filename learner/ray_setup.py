"""Set up every Ray worker process the learner's cluster starts (runtime_env's
worker_process_setup_hook, given by import path: nothing is pickled).

Ray Train's placement-group cleaner asks Ray's state API once a second whether the training
controller is alive. The state API is served by Ray's dashboard, which the learner does not start
(`include_dashboard=False`; it needs ray[default], not a dependency), so every ask fails and logs a warning:
about 300 identical lines in a 5-minute demo, burying the learner's own output. The cleaner only
matters when the controller dies without cleaning up; it still runs, and still logs errors.
"""
from __future__ import annotations

import logging

NOISY = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)


HOOK = f"{__name__}.quiet_worker_logs"
