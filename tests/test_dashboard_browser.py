"""The dashboard page in a real browser: Debian's headless Chromium driven by Playwright, against
the real service (uvicorn), real actor daemons on the gRPC robot link, a real Redis and store.

The page loads with an operator token, robots appear, a takeover clicked on a card reaches the
daemon (and so the robot link), and a screenshot goes to docs/img/dashboard.png. Past episodes
(hours of them, so the success-over-time plots have a history) are committed to the store and
announced on the stream exactly as uploaders do; today's come from the daemons.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = os.environ.get("FLEETLOOP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("no Chromium: install Debian's (`apt-get install -y chromium chromium-driver`); "
                "this test never downloads a browser", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs `pip install playwright` "
                                                            "(the Python package only; never `playwright install`)")

from fleetloop import config  # noqa: E402
from fleetloop.actor.daemon import ActorDaemon, FixedPolicySource  # noqa: E402
from fleetloop.actor.link import RobotLinkClient  # noqa: E402
from fleetloop.actor.spool import Spool  # noqa: E402
from fleetloop.buffer.codec import commit_episode, encode_chunk, encode_image, manifest_to_bytes  # noqa: E402
from fleetloop.buffer.queue import EpisodeAnnouncer  # noqa: E402
from fleetloop.buffer.store import LocalStore  # noqa: E402
from fleetloop.dashboard.app import DashboardServer, build_app  # noqa: E402
from fleetloop.dashboard.auth import OPERATOR, VIEWER, TokenTable  # noqa: E402
from fleetloop.policy.interface import Observation  # noqa: E402
from fleetloop.release.registry import PolicyRegistry  # noqa: E402
from fleetloop.proto.v1 import SCHEMA_VERSION  # noqa: E402
from fleetloop.proto.v1 import episode_pb2 as pb  # noqa: E402

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "dashboard.png"
OP_TOKEN, VIEWER_TOKEN = "alice-operator-token-0001", "wall-viewer-token-0001"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TASKS = {"reach-v3": ("reach the red goal", 0.62), "push-v3": ("push the puck to the goal", 0.38),
         "pick-place-v3": ("pick up the cube and place it", 0.22)}
ROBOTS = [f"robot-{i:02d}" for i in range(1, 9)]


class ConstantPolicy:
    horizon, action_dim = 4, 4

    def __init__(self, version: str):
        self.version = version

    def act(self, obs, instruction, indicator=None):
        return np.full((4, 4), 0.1, np.float32)


def scene(t: int, n: int, task: str, human: bool) -> np.ndarray:
    """A small camera frame: a gripper (square) moving toward a goal (dot)."""
    h, w = 60, 80
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = np.linspace(38, 70, w, dtype=np.uint8)[None, :, None]
    gy, gx = {"reach-v3": (20, 62), "push-v3": (40, 66), "pick-place-v3": (14, 58)}[task]
    yy, xx = np.ogrid[:h, :w]
    img[(yy - gy) ** 2 + (xx - gx) ** 2 <= 16] = (235, 80, 80)
    f = t / max(1, n - 1)
    cy, cx = int(46 - f * (46 - gy)), int(10 + f * (gx - 10 - 6))
    img[max(0, cy - 5):cy + 5, max(0, cx - 5):cx + 5] = (255, 180, 60) if human else (90, 170, 255)
    return img


def seed_history(store, client, registry_versions: list[str], hours: float = 6.0, per_task_hour: int = 12,
                 seed: int = 7) -> int:
    """Hours of past rollouts, each committed to the store (chunks, then the manifest) and
    announced on the episode stream, as the uploader does. Later versions do better and need
    fewer interventions, which is what the plots should show."""
    rng = np.random.default_rng(seed)
    announcer = EpisodeAnnouncer(client)
    now = time.time_ns()
    n_total = int(hours * per_task_hour)
    count = 0
    for task, (instruction, base) in TASKS.items():
        for i in range(n_total):
            ended = now - int((hours - i / per_task_hour) * 3600e9) + int(rng.integers(0, 300e9))
            era = min(len(registry_versions) - 2, int(i / n_total * (len(registry_versions) - 1)))
            version = registry_versions[era]
            p_success = min(0.95, base + 0.12 * era)
            intervened = rng.random() < max(0.05, 0.45 - 0.1 * era)
            success = rng.random() < (p_success + (0.1 if intervened else 0.0))
            robot = ROBOTS[int(rng.integers(0, len(ROBOTS) - 1))]
            n = 24
            steps = []
            for t in range(n):
                human = intervened and 9 <= t < 15
                steps.append(pb.Step(index=t, timestamp_ns=ended - (n - t) * 100_000_000,
                                     images=[encode_image(scene(t, n, task, human), "front")],
                                     state=rng.standard_normal(6).astype(np.float32).tolist(),
                                     action=rng.uniform(-1, 1, 4).astype(np.float32).tolist(), intervention=human))
            eid = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(ended / 1e9))}-{robot}-{uuid.uuid4().hex[:12]}"
            m = pb.EpisodeManifest(schema_version=SCHEMA_VERSION, episode_id=eid, robot_id=robot, task_id=task,
                                   instruction=instruction, policy_version=version, kind=pb.EPISODE_KIND_ROLLOUT,
                                   outcome=pb.OUTCOME_SUCCESS if success else pb.OUTCOME_FAILURE,
                                   outcome_source=pb.LABEL_SOURCE_ENVIRONMENT, started_ns=ended - n * 100_000_000,
                                   ended_ns=ended, num_steps=n, cameras=["front"])
            if intervened:
                m.interventions.add(start_step=9, end_step=15, operator="bob", reason="drift")
            key = commit_episode(store, m, [(encode_chunk(eid, 0, steps), n)])
            announcer.announce(pb.EpisodeEvent(episode_id=eid, manifest_key=key, robot_id=robot, task_id=task,
                                               ended_ns=ended, schema_version=SCHEMA_VERSION,
                                               manifest_json=manifest_to_bytes(m).decode()))
            count += 1
    return count


def obs(t: int, task: str = "reach-v3", human: bool = False) -> Observation:
    return Observation(images={"front": scene(t, 12, task, human)}, state=np.arange(6, dtype=np.float32) + t)


@pytest.fixture
def fleet(tmp_path, redis_client):
    store = LocalStore(tmp_path / "store")
    registry = PolicyRegistry(store, redis_client)
    versions = [registry.publish(f"weights-{i}".encode() * 64, json.dumps({"i": i}), learner_step=2500 * i,
                                 algorithm="hg-dagger", metrics={"loss": round(0.9 / i, 3)},
                                 parent_version=f"v{i - 1:06d}" if i > 1 else "").version for i in range(1, 6)]
    n_seeded = seed_history(store, redis_client, versions)
    registry.promote(versions[3], by="alice")           # v4 runs the fleet; v5 is on canary
    registry.set_canary(versions[4], robot_ids=["robot-06"], by="alice")
    registry.pin_robot("robot-03", versions[2], by="alice")

    # robot-05's uploader once set an unreadable episode aside: its card says so
    damaged = tmp_path / "spool-robot-05" / ".damaged-20261129T000000-robot-05-0123456789ab"
    damaged.mkdir(parents=True)
    (damaged / "meta.json").write_text("{")
    daemons = {}
    for rid in ROBOTS:
        version = {"robot-06": versions[4], "robot-03": versions[2]}.get(rid, versions[3])
        daemons[rid] = ActorDaemon(rid, store, redis_client, Spool(tmp_path / f"spool-{rid}"),
                                   FixedPolicySource(ConstantPolicy(version)), grpc_address="127.0.0.1:0",
                                   heartbeat_interval_s=0.3, episode_idle_timeout_s=300).start()
    for rid in ROBOTS:  # commands need the daemons listening
        channel = config.CONTROL_CHANNEL_PREFIX + rid
        deadline = time.monotonic() + 10
        while redis_client.pubsub_numsub(channel)[0][1] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    links = {rid: RobotLinkClient(d.address, rid) for rid, d in daemons.items()}
    # Today's episodes through the robot link, then a few robots busy with an open episode.
    for k, rid in enumerate(ROBOTS[:6]):
        task = list(TASKS)[k % 3]
        link = links[rid]
        link.start_episode(task, TASKS[task][0])
        for t in range(12):
            human = k == 1 and 4 <= t < 8
            if k == 1 and t == 4:
                link.begin_intervention("bob", "stall")
            if k == 1 and t == 8:
                link.end_intervention()
            link.report_step(obs(t, task, human), link.act(obs(t, task))[0] if not human else [0.5, 0, 0, 0],
                             intervention=human)
        link.end_episode(pb.OUTCOME_SUCCESS if k % 4 else pb.OUTCOME_FAILURE)
    for rid in ("robot-01", "robot-02", "robot-04", "robot-06"):
        task = {"robot-01": "reach-v3", "robot-02": "push-v3", "robot-04": "pick-place-v3", "robot-06": "reach-v3"}[rid]
        links[rid].start_episode(task, TASKS[task][0])
        links[rid].report_step(obs(0, task), [0, 0, 0, 0], intervention=False)
    daemons["robot-08"].stop()  # one robot goes dark: its card turns offline

    # The learner's stats hash, moving like a running learner's would.
    stop = threading.Event()

    def learner():
        step = 12_400
        while not stop.is_set():
            step += 7
            stats = {"step": step, "samples_per_s": 1830.5 + 20 * math.sin(step / 50),
                     "losses": {"bc": 0.113, "value": 0.042}, "buffer": {"online_frames": 84_200, "offline_frames": 250_000},
                     "staleness": {"mean_versions": 0.6, "max_versions": 2}, "w_on": 0.5,
                     "versions": {"published": versions[4]}}
            redis_client.hset(config.LEARNER_STATS_KEY, mapping={k: json.dumps(v) for k, v in stats.items()})
            stop.wait(0.5)

    threading.Thread(target=learner, daemon=True).start()

    tokens = TokenTable()
    tokens.add("alice", OP_TOKEN, OPERATOR)
    tokens.add("wall", VIEWER_TOKEN, VIEWER)
    app, dash = build_app(redis_client, store, tokens, offline_after_s=1.5)
    server = DashboardServer(app).start()
    deadline = time.monotonic() + 60
    while len(dash.index) < n_seeded + 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(dash.index) >= n_seeded + 6, "the dashboard did not index the fleet's episodes"
    yield {"url": server.url, "daemons": daemons, "links": links, "dash": dash, "versions": versions}
    stop.set()
    server.stop()
    for link in links.values():
        link.close()
    for rid, d in daemons.items():
        if rid != "robot-08":
            d.stop()


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_page_shows_the_fleet_and_a_takeover_click_reaches_the_robot(fleet, browser):
    page = browser.new_page(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: d.accept())
    requests = []
    page.on("request", lambda r: requests.append(r.url))

    page.goto(f"{fleet['url']}/#token={OP_TOKEN}")
    # The token left the address bar; the page knows who we are; robots arrive over the live stream.
    sync_api.expect(page.locator("#who")).to_have_text("alice · operator")
    assert "token" not in page.url
    sync_api.expect(page.locator("#live")).to_contain_text("live", timeout=10_000)
    sync_api.expect(page.locator(".card")).to_have_count(len(ROBOTS), timeout=10_000)
    sync_api.expect(page.locator('.card[data-robot="robot-08"]')).to_have_class("card offline", timeout=10_000)
    sync_api.expect(page.locator('.card[data-robot="robot-01"] .task')).to_contain_text("reach-v3")
    sync_api.expect(page.locator('.card[data-robot="robot-06"] .chips')).to_contain_text("canary")
    sync_api.expect(page.locator('.card[data-robot="robot-03"] .chips')).to_contain_text("pinned")
    sync_api.expect(page.locator('.card[data-robot="robot-05"]')).to_contain_text("1 damaged")
    sync_api.expect(page.locator('.card[data-robot="robot-04"]')).not_to_contain_text("damaged")
    sync_api.expect(page.locator(".chart")).to_have_count(len(TASKS), timeout=10_000)
    sync_api.expect(page.locator("#policy-table tbody tr")).to_have_count(5)
    sync_api.expect(page.locator("#ep-table tbody tr")).to_have_count(15)

    # Take over robot-02 from its card: the daemon gets it, the robot link reports it, the card turns.
    daemon, link = fleet["daemons"]["robot-02"], fleet["links"]["robot-02"]
    card = page.locator('.card[data-robot="robot-02"]')
    card.get_by_role("button", name="Take over").click()
    deadline = time.monotonic() + 10
    while not daemon.takeover_requested and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.takeover_requested
    link.report_step(obs(1, "push-v3"), [0, 0, 0, 0], intervention=False)
    assert link.takeover_requested
    sync_api.expect(card).to_have_class("card take", timeout=10_000)
    sync_api.expect(card.get_by_role("button", name="Release")).to_be_visible()
    sync_api.expect(page.locator("#audit-table tbody tr").first).to_contain_text("robot.takeover", timeout=10_000)
    sync_api.expect(page.locator("#audit-table tbody tr").first).to_contain_text("alice")

    # An episode's detail: thumbnails come from the store through the API, with the token header.
    page.locator("#ep-table tbody tr").first.click()
    sync_api.expect(page.locator("#episode-dialog")).to_be_visible()
    sync_api.expect(page.locator("#episode-dialog .strip img")).to_have_count(12)
    page.wait_for_function("() => [...document.querySelectorAll('#episode-dialog .strip img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=10_000)
    page.locator("#episode-dialog [data-close]").click()

    page.evaluate("() => { window.scrollTo(0, 0); document.querySelectorAll('.toast').forEach(t => t.remove()); }")
    page.wait_for_timeout(1500)  # one more snapshot: the step rate and fresh ages
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 50_000

    assert not errors, errors
    assert all(u.startswith(fleet["url"]) or u.startswith("blob:") or u.startswith("data:") for u in requests), \
        "the page fetched something from outside the service"
    assert not any("token=" in u for u in requests), "a token travelled in a URL"


def test_a_viewer_sees_the_fleet_but_cannot_act(fleet, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{fleet['url']}/#token={VIEWER_TOKEN}")
    sync_api.expect(page.locator("#who")).to_have_text("wall · viewer")
    sync_api.expect(page.locator(".card")).to_have_count(len(ROBOTS), timeout=10_000)
    take = page.locator('.card[data-robot="robot-01"] .buttons button').first
    sync_api.expect(take).to_be_disabled()
    sync_api.expect(page.locator('[data-act="rollback"]')).to_be_disabled()
    # Even a hand-made request with the viewer token is refused by the server.
    status = page.evaluate(
        """async (token) => (await fetch('api/robots/robot-01/takeover',
               {method: 'POST', headers: {Authorization: 'Bearer ' + token}})).status""", VIEWER_TOKEN)
    assert status == 403
    assert not fleet["daemons"]["robot-01"].takeover_requested


def test_without_a_token_the_page_asks_for_one(fleet, browser):
    page = browser.new_page()
    page.goto(fleet["url"] + "/")
    sync_api.expect(page.locator("#token-dialog")).to_be_visible()
    page.fill("#token-input", "not-the-right-token")
    page.get_by_role("button", name="Use token").click()
    sync_api.expect(page.locator("#token-error")).to_contain_text("not accepted")
    page.fill("#token-input", OP_TOKEN)
    page.get_by_role("button", name="Use token").click()
    sync_api.expect(page.locator("#who")).to_have_text("alice · operator")
    sync_api.expect(page.locator(".card")).to_have_count(len(ROBOTS), timeout=10_000)
    assert page.evaluate("() => localStorage.getItem('fleetloop.dashboard.token')") == OP_TOKEN
