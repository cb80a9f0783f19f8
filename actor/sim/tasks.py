"""The simulated task catalogue: every MetaWorld v3 task fleetloop knows, with the language
instruction the policy is conditioned on and a default episode length. One place: the env, the
expert, `fleetloop collect` and `fleetloop eval` all look tasks up here.

Episode lengths are about 1.5-2x the scripted expert's slowest success (measured over 30 seeds),
so a competent policy has slack to recover but a hopeless one fails fast; short episodes are what
make the on-CPU demo loop quick. Instructions are unique per task, so an instruction alone
identifies its task (the expert policy relies on that).

This module imports nothing heavy (no MuJoCo), so CLIs can validate task names cheaply.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str          # MetaWorld v3 environment name, also fleetloop's task_id
    instruction: str   # the language instruction given to the policy
    max_steps: int     # default episode length in control steps


_TASKS = (
    TaskSpec("reach-v3", "reach to the red goal", 100),
    TaskSpec("push-v3", "push the puck to the green goal", 120),
    TaskSpec("pick-place-v3", "pick up the puck and place it at the blue goal", 120),
    TaskSpec("drawer-open-v3", "open the drawer", 150),
    TaskSpec("drawer-close-v3", "close the drawer", 150),
    TaskSpec("door-open-v3", "open the door", 180),
    TaskSpec("button-press-topdown-v3", "press the button from the top", 120),
    TaskSpec("button-press-v3", "press the button from the front", 120),
    TaskSpec("window-open-v3", "slide the window open", 150),
    TaskSpec("window-close-v3", "slide the window closed", 150),
    TaskSpec("handle-press-v3", "press the handle down", 100),
    TaskSpec("plate-slide-v3", "slide the plate into the goal", 100),
    TaskSpec("peg-insert-side-v3", "insert the peg into the hole from the side", 200),
    # Harder, multi-stage tasks (grasp, carry, place/insert). Expert: 10/10 over seeds 0-9;
    # lengths ~1.5-2x the slowest expert success there.
    TaskSpec("assembly-v3", "put the ring onto the peg", 150),
    TaskSpec("pick-place-wall-v3", "pick up the puck and place it behind the wall", 200),
    TaskSpec("hammer-v3", "hammer the nail into the wall", 120),
    TaskSpec("basketball-v3", "put the ball into the hoop", 160),
    TaskSpec("shelf-place-v3", "place the block on the shelf", 200),
    TaskSpec("coffee-push-v3", "push the mug under the coffee machine", 100),
)

TASKS: dict[str, TaskSpec] = {t.name: t for t in _TASKS}

# Tasks for the on-CPU demo: short episodes, and a small policy behaviour-cloned on ~5 demos per
# task lands mid-range (success ~0.4-0.8) and climbs within a few dozen corrected rollouts.
# (Measured with a state-only MLP proxy. Door, drawer, window and button tasks are learned
# almost perfectly from the same few demos -- nothing left to show -- and peg-insert-side
# improves too but has 200-step episodes.)
DEMO_TASKS: tuple[str, ...] = ("reach-v3", "push-v3", "pick-place-v3")

# The learning benchmark's suite (`fleetloop bench learning`, `--tasks suite`): ten tasks, six of
# them multi-stage (grasp + carry + place/insert), and per task the number of expert
# demonstrations the suite's pretraining uses -- chosen so a tiny state + language policy
# behaviour-cloned on all ten lands mid-range (measured per task: docs/learning.md). Easy tasks
# get few demonstrations, hard ones more. Demonstration seeds are 0..n-1; evaluation seeds start
# at 1,000,000 (fleetloop.actor.sim.evaluate.EVAL_SEED), so the two never overlap.
SUITE_DEMOS: dict[str, int] = {
    "reach-v3": 3,
    "push-v3": 2,
    "pick-place-v3": 8,
    "peg-insert-side-v3": 7,
    "assembly-v3": 2,
    "pick-place-wall-v3": 5,
    "hammer-v3": 4,
    "basketball-v3": 7,
    "shelf-place-v3": 8,
    "coffee-push-v3": 2,
}
SUITE_TASKS: tuple[str, ...] = tuple(SUITE_DEMOS)

_BY_INSTRUCTION: dict[str, TaskSpec] = {t.instruction: t for t in _TASKS}
assert len(_BY_INSTRUCTION) == len(_TASKS), "instructions must be unique per task"


class UnknownTaskError(ValueError):
    """A task name that is not in the catalogue."""


def get_task(name: str) -> TaskSpec:
    """Look a task up by name; raises UnknownTaskError naming the close matches and the catalogue."""
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, TASKS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownTaskError(
            f"unknown task {name!r}.{hint} Known tasks: {', '.join(TASKS)}") from None


def task_for_instruction(instruction: str) -> TaskSpec:
    """The task an instruction belongs to (instructions are unique)."""
    try:
        return _BY_INSTRUCTION[instruction]
    except KeyError:
        raise UnknownTaskError(f"no task has the instruction {instruction!r}") from None


def parse_task_list(text: str) -> list[str]:
    """'reach-v3,push-v3' -> validated names, in order, without duplicates. 'demo', 'suite' and
    'all' are shorthands for DEMO_TASKS, SUITE_TASKS and the whole catalogue."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        expanded = {"demo": DEMO_TASKS, "suite": SUITE_TASKS, "all": tuple(TASKS)}.get(part, (part,))
        for name in expanded:
            get_task(name)
            if name not in names:
                names.append(name)
    if not names:
        raise UnknownTaskError("no tasks given")
    return names
