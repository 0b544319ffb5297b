"""Public-Space hardening of the served Studio (issue 16), driven as an outside visitor would: raw
HTTP (httpx) and gradio_client against the app launched on localhost with a small model.

Per-client queue cap (1), capped (or closed) uploads and closed recording (2), REST callers' preview segments freed (3), runs
of one session side by side and Stop on a queued run (4), HTML in a prompt shown as text (6), no
server path in an error (7), wrong-typed API values named in the error (9).
"""

from __future__ import annotations

import concurrent.futures
import html
import json
import os
import threading
import time

import httpx
import pytest

from packforcing import safety, studio
from packforcing.studio import admission
from tests.conftest import launch_local
from tests.test_bad_inputs import one_thread, small_pipeline  # noqa: F401 (one_thread: autouse fixture)

PROMPT = "a red circle bouncing over a navy background"
API = "gradio_api"


@pytest.fixture(scope="module")
def pipe():
    return small_pipeline(32)  # 32x32: ~0.2 s a block on one core (window / sink_window / full)


@pytest.fixture()
def serve(pipe, tmp_path, monkeypatch):
    """``serve(**env)``: the Studio built with those PACKFORCING_* settings, launched on localhost;
    returns (url, demo). Closed after the test."""
    for name in list(os.environ):
        if name.startswith("PACKFORCING_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(safety.MIN_SECONDS_ENV, "1")
    monkeypatch.setenv(safety.RUNS_DIR_ENV, str(tmp_path / "runs"))
    monkeypatch.setitem(studio._PIPELINES, studio.DEFAULT_MODEL, pipe)
    demos = []

    def start(**env):
        import app

        for name, value in env.items():
            monkeypatch.setenv(getattr(safety, name), str(value))
        demo = app.build_demo()
        demos.append(demo)
        return launch_local(demo), demo

    yield start
    for demo in demos:
        demo.close()


def rest_data(url: str, api: str = "/generate", **values) -> list:
    """Every input of an endpoint, in order: its defaults with ``values`` replaced (raw REST needs all)."""
    info = httpx.get(f"{url}{API}/info").json()["named_endpoints"][api]["parameters"]
    names = [p["parameter_name"] for p in info]
    assert set(values) <= set(names)
    return [values.get(p["parameter_name"], p.get("parameter_default")) for p in info]


def post(url: str, data: list, api: str = "generate", headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}{API}/call/{api}", content=json.dumps({"data": data}),  # json.dumps: NaN allowed
                      headers={"content-type": "application/json", **(headers or {})}, timeout=60)


def events(url: str, event_id: str, api: str = "generate", timeout: float = 120) -> list[tuple[str, str]]:
    """The (event, data) messages of a REST call, to its end."""
    out, name = [], None
    with httpx.stream("GET", f"{url}{API}/call/{api}/{event_id}", timeout=timeout) as response:
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                out.append((name, line.split(":", 1)[1].strip()))
    return out


def client(url: str, **kwargs):
    from gradio_client import Client

    return Client(url, verbose=False, **kwargs)


# ---- 1. one anonymous client cannot lock everyone out -------------------------------------------
def test_one_client_address_cannot_fill_the_queue(serve, monkeypatch):
    gate, stream = threading.Event(), studio.device_stream

    def held(request):  # runs wait here until the test has counted: none ends while the flood arrives
        gate.wait(60)
        yield from stream(request)

    monkeypatch.setattr(studio, "device_stream", held)
    url, _ = serve(JOBS_PER_CLIENT_ENV=2, TRUSTED_PROXIES_ENV=1)
    data = rest_data(url, prompt=PROMPT, seconds=3, policy="window")
    flooder = {"X-Forwarded-For": "203.0.113.7"}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # concurrent, as an attacker would
        answers = list(pool.map(lambda _: post(url, data, headers=flooder), range(66)))
    codes = [r.status_code for r in answers]
    assert codes.count(200) == 2 and codes.count(429) == 64, codes
    refused = next(r for r in answers if r.status_code == 429).json()["detail"]
    assert "2 already queued or running" in refused and safety.JOBS_PER_CLIENT_ENV in refused
    # a forged entry to the left of the proxy's does not make a new client
    assert post(url, data, headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}).status_code == 429
    # every other visitor is still served: through raw HTTP and through gradio_client
    other = post(url, data, headers={"X-Forwarded-For": "198.51.100.2"})
    assert other.status_code == 200
    gate.set()
    visitor = client(url, headers={"X-Forwarded-For": "198.51.100.3"})
    try:
        out = visitor.predict(prompt=PROMPT, seconds=1, policy="window", api_name="/generate")
    finally:
        visitor.close()
    assert "Done" in out[0]
    for r in [*(a for a in answers if a.status_code == 200), other]:
        assert events(url, r.json()["event_id"])[-1][0] == "complete"
    # the flooder's places are free again once its runs ended
    assert post(url, data, headers=flooder).status_code == 200


def test_client_address_behind_proxies():
    class Req:
        def __init__(self, peer, forwarded):
            self.client = type("C", (), {"host": peer})()
            self.headers = httpx.Headers([("x-forwarded-for", f) for f in forwarded])

    assert admission.client_address(Req("10.0.0.9", ["1.2.3.4"]), 0) == "10.0.0.9"  # no proxy: the peer
    assert admission.client_address(Req("10.0.0.9", ["6.6.6.6, 1.2.3.4"]), 1) == "1.2.3.4"
    assert admission.client_address(Req("10.0.0.9", ["6.6.6.6", "1.2.3.4, 10.0.0.8"]), 2) == "1.2.3.4"
    assert admission.client_address(Req("10.0.0.9", []), 1) == "10.0.0.9"  # no header: the peer


# ---- 2. uploads: only the Replay tab's files, capped; recording closed ------------------------------
def test_uploads_are_capped_and_can_be_closed_and_recording_is_closed(serve):
    url, _ = serve(MAX_UPLOAD_MB_ENV=1)
    assert httpx.get(f"{url}config").json()["max_file_size"] == 2**20  # PACKFORCING_MAX_UPLOAD_MB=1
    r = httpx.post(f"{url}{API}/upload", files={"files": ("t.csv", b"a,b\n1,2\n")}, timeout=60)
    assert r.status_code == 200  # the Replay tab's trace
    big = os.urandom(3 * 2**20)
    r = httpx.post(f"{url}{API}/upload", files={"files": ("x.parquet", big)}, timeout=60)
    assert r.status_code in (400, 413) and "size" in r.text.lower(), (r.status_code, r.text[:200])
    r = httpx.post(f"{url}{API}/process_recording", files={"video": ("v.mp4", b"\0" * 1024)}, timeout=60)
    assert r.status_code == 403 and "recording is closed" in r.json()["detail"]
    closed_url, _ = serve(MAX_UPLOAD_MB_ENV=1, UPLOADS_ENV=0)
    r = httpx.post(f"{closed_url}{API}/upload", files={"files": ("t.csv", b"a,b\n1,2\n")}, timeout=60)
    assert r.status_code == 403 and "uploads are closed" in r.json()["detail"]
    out = client(closed_url).predict(prompt=PROMPT, seconds=1, policy="window", api_name="/generate")
    assert "Done" in out[0]  # generation needs no upload


# ---- 3. preview segments of REST callers are freed ------------------------------------------------
def test_rest_callers_preview_segments_are_freed_when_the_run_ends(serve):
    url, demo = serve()
    r = post(url, rest_data(url, prompt=PROMPT, seconds=2, policy="window"))
    event_id = r.json()["event_id"]  # a REST call's session is its event id
    messages = events(url, event_id)
    assert messages[-1][0] == "complete"
    assert any("playlist.m3u8" in data for _, data in messages)  # the preview did stream
    deadline = time.monotonic() + 10
    while event_id in demo.pending_streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert event_id not in demo.pending_streams
    # a page (here gradio_client, which keeps a heartbeat) keeps its streams for the player
    page = client(url)
    try:
        page.predict(prompt=PROMPT, seconds=1, policy="window", api_name="/generate")
        time.sleep(0.5)
        assert page.session_hash in demo.pending_streams
    finally:
        page.close()


# ---- 4. runs of one session side by side; Stop on a queued run ------------------------------------
def test_a_second_job_of_the_same_session_does_not_stop_the_first(serve):
    url, _ = serve(CONCURRENCY_ENV=2)
    api = client(url)
    try:
        first = api.submit(prompt=PROMPT, seconds=10, seed=1, policy="window", api_name="/generate")
        deadline = time.monotonic() + 60
        while len(first.outputs()) < 2:  # the first run is generating
            assert time.monotonic() < deadline and not first.done()
            time.sleep(0.05)
        second = api.submit(prompt=PROMPT, seconds=2, seed=2, policy="window", api_name="/generate")
        results = [first.result(timeout=120), second.result(timeout=120)]
    finally:
        api.close()
    assert all("Done" in out[0] and "Stopped" not in out[0] for out in results), [out[0] for out in results]
    assert "block 10/10" in results[0][0] and "block 2/2" in results[1][0]


def test_stop_reaches_a_run_still_waiting_in_the_queue(serve):
    from gradio_client.exceptions import AppError

    url, _ = serve(CONCURRENCY_ENV=1)
    ahead, waiting = client(url), client(url)
    try:
        running = ahead.submit(prompt=PROMPT, seconds=60, policy="window", api_name="/generate")
        deadline = time.monotonic() + 60
        while len(running.outputs()) < 2:
            assert time.monotonic() < deadline and not running.done()
            time.sleep(0.05)
        queued = waiting.submit(prompt=PROMPT, seconds=2, policy="window", api_name="/generate")
        time.sleep(0.5)
        assert not queued.done()
        t0 = time.monotonic()
        waiting.predict(api_name="/stop")
        with pytest.raises(AppError, match="Stopped before it started"):
            queued.result(timeout=20)
        assert time.monotonic() - t0 < 10 and not running.done()  # it did not wait for its turn
        ahead.predict(api_name="/stop")
        out = running.result(timeout=60)
    finally:
        ahead.close()
        waiting.close()
    assert "Stopped" in out[0] and out[2]  # the run ahead kept its partial video


# ---- 6. HTML in a prompt is text ------------------------------------------------------------------
def test_html_in_a_prompt_is_escaped_in_warnings_and_errors(serve):
    url, _ = serve()
    session = "hardening-html"
    data = rest_data(url, prompt="<img src=x onerror=alert(1)> a red circle", seconds=1, policy="window")
    r = httpx.post(f"{url}{API}/queue/join", json={"data": data, "fn_index": _fn_index(url, "generate"),
                                                   "session_hash": session, "event_data": None, "trigger_id": None})
    assert r.status_code == 200
    logs = []
    with httpx.stream("GET", f"{url}{API}/queue/data", params={"session_hash": session}, timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "log":
                    logs.append(message["log"])
                if message.get("msg") == "process_completed":
                    break
    warning = next(text for text in logs if "only knows simple scenes" in text)
    assert "&lt;img src=x onerror=alert(1)&gt;" in warning and "<img" not in warning
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        client(url).predict(prompt=PROMPT, seconds=1, policy="<b>window</b>", api_name="/generate")
    assert "&lt;b&gt;window&lt;/b&gt;" in str(err.value) and "<b>" not in str(err.value)


def _fn_index(url: str, api_name: str) -> int:
    config = httpx.get(f"{url}config").json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


# ---- 7. no server path in an error ----------------------------------------------------------------
def test_a_broken_cached_hub_model_error_shows_no_server_path(serve, tmp_path, monkeypatch):
    from gradio_client.exceptions import AppError
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    snapshot = cache / "models--someone--broken" / "snapshots" / ("0" * 40)
    (snapshot / "transformer").mkdir(parents=True)
    (snapshot / "transformer" / "config.json").write_text("{}")
    (cache / "models--someone--broken" / "refs").mkdir()
    (cache / "models--someone--broken" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv(safety.ALLOWED_MODELS_ENV, "someone/broken")
    url, _ = serve()
    api = client(url)
    try:
        with pytest.raises(AppError) as err:
            api.predict(prompt=PROMPT, seconds=1, policy="window", model="someone/broken", api_name="/generate")
        message = html.unescape(str(err.value))  # what the toast shows (its HTML is escaped)
        assert "cannot be loaded" in message and "<hf-cache>/models--someone--broken" in message, message
        assert str(tmp_path) not in message and "/tmp" not in message and "/root" not in message, message
        out = api.predict(prompt=PROMPT, seconds=1, policy="window", api_name="/generate")
    finally:
        api.close()
    assert "Done" in out[0]


def test_public_text_masks_every_server_path(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv(safety.MODELS_DIR_ENV, str(tmp_path))
    text = (f"no checkpoint at {tmp_path}/m/transformer; see /etc/passwd and {tempfile.gettempdir()}/x.mp4 "
            f"({os.path.expanduser('~')}/secret); block 5/5, owner/name, http://host/a/b")
    shown = safety.public_text(text)
    assert shown == ("no checkpoint at <models>/m/transformer; see <path>/passwd and <tmp>/x.mp4 "
                     "(<home>/secret); block 5/5, owner/name, http://host/a/b"), shown


# ---- 9. wrong-typed API values --------------------------------------------------------------------
@pytest.mark.parametrize("values, field", [
    ({"seconds": "1e9"}, r"duration must be between 1 and 120 seconds, got 1e\+09"),
    ({"seconds": None}, "duration must be a number of seconds, got None"),
    ({"seconds": [1]}, r"duration must be a number of seconds, got \[1\]"),
    ({"seed": "inf"}, "seed must be a whole number .* got 'inf'"),
    ({"randomize_seed": "yes"}, "randomize_seed must be true or false, got 'yes'"),
    ({"occ_layer": "x"}, r"occ_layer must be one of mean, 0…\d, got 'x'"),
    ({"occ_unit": ["MB"]}, r"occ_unit must be one of \['tokens', 'MB'\]"),
    ({"window_frames": "many"}, "window: Window frames"),
])
def test_wrong_typed_api_values_name_the_field(values, field, serve):
    from gradio_client.exceptions import AppError

    url, _ = serve()
    api = client(url)
    try:
        with pytest.raises(AppError, match=field):
            api.predict(**{"prompt": PROMPT, "seconds": 1, "policy": "window", **values}, api_name="/generate")
        out = api.predict(prompt=PROMPT, seconds=1, policy="window", api_name="/generate")
    finally:
        api.close()
    assert "Done" in out[0]  # the server still serves


def test_wrong_typed_values_through_raw_http(serve):
    url, _ = serve()
    cases = [("generate", {"seed": float("nan")}, "seed must be a whole number .*got nan"),
             ("generate", {"seconds": "five"}, "duration must be a number of seconds, got 'five'"),
             ("compare", {"policies": None}, "policies must be a list of two or more cache policy names"),
             ("compare", {"policies": "window"}, "policies must be a list"),
             ("compare", {"policies": ["window"]}, "at least two cache policies")]
    import re

    for api, values, match in cases:
        base = {"prompt": PROMPT, "seconds": 1, "policy": "window", **values}
        r = post(url, rest_data(url, f"/{api}", **base), api)
        assert r.status_code == 200
        name, data = events(url, r.json()["event_id"], api)[-1]
        assert name == "error" and re.search(match, json.loads(data)["error"]), (api, values, data)
    r = post(url, rest_data(url, prompt=PROMPT, seconds=1, policy="window"))
    assert events(url, r.json()["event_id"])[-1][0] == "complete"


@pytest.mark.parametrize("env, value, expected", [
    (safety.JOBS_PER_CLIENT_ENV, None, 2), (safety.JOBS_PER_CLIENT_ENV, "5", 5), (safety.JOBS_PER_CLIENT_ENV, "0", 2),
    (safety.JOBS_PER_CLIENT_ENV, "1.5", 2), (safety.TRUSTED_PROXIES_ENV, None, 0), (safety.TRUSTED_PROXIES_ENV, "2", 2),
    (safety.TRUSTED_PROXIES_ENV, "-1", 0), (safety.MAX_UPLOAD_MB_ENV, None, 32 * 2**20),
    (safety.MAX_UPLOAD_MB_ENV, "16", 16 * 2**20), (safety.MAX_UPLOAD_MB_ENV, "nan", 32 * 2**20),
    (safety.UPLOADS_ENV, None, True), (safety.UPLOADS_ENV, "0", False), (safety.UPLOADS_ENV, "yes", True),
])
def test_new_limits_come_from_the_environment(env, value, expected, monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv(env, raising=False)
    if value is not None:
        monkeypatch.setenv(env, value)
    read = {safety.JOBS_PER_CLIENT_ENV: safety.jobs_per_client, safety.TRUSTED_PROXIES_ENV: safety.trusted_proxies,
            safety.MAX_UPLOAD_MB_ENV: safety.max_upload_bytes, safety.UPLOADS_ENV: safety.uploads_enabled}[env]
    assert read() == expected


def test_on_a_space_one_proxy_is_trusted_by_default(monkeypatch):
    monkeypatch.delenv(safety.TRUSTED_PROXIES_ENV, raising=False)
    monkeypatch.setenv("SPACE_ID", "someone/space")
    assert safety.trusted_proxies() == 1
    monkeypatch.setenv(safety.TRUSTED_PROXIES_ENV, "0")
    assert safety.trusted_proxies() == 0
