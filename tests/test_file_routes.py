"""Issue 15 item 3: through every file route of the served app, a visitor gets only their own outputs
(and the app's public static files) — never a server file, whatever the spelling of the path."""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle bouncing over a navy background"
SECRET_FILES = [Path("/etc/passwd"), ROOT / "app.py", ROOT / "packforcing" / "__init__.py", ROOT / ".git" / "HEAD",
                ROOT / "assets" / "tiny-world" / "tiny_world.json", ROOT / "assets" / "tiny-world" / "vae" / "config.json",
                ROOT / "requirements.txt"]


def routes(base: str) -> list[str]:
    """The file-serving URL prefixes of the installed Gradio (with and without the API prefix)."""
    return [f"{base}gradio_api/file=", f"{base}gradio_api/file/", f"{base}file=", f"{base}file/"]


def spellings(path: Path) -> list[str]:
    """Ways to name `path`: absolute, traversal from the cache, URL- and double-encoded."""
    text = str(path)
    up = "../" * 12 + text.lstrip("/")
    return [text, up, urllib.parse.quote(text, safe=""), urllib.parse.quote(up, safe=""),
            urllib.parse.quote(urllib.parse.quote(up, safe=""), safe=""), up.replace("/", "%2f"),
            "..%2f" * 12 + text.lstrip("/"), "....//" * 12 + text.lstrip("/")]


def generate(base: str, client: httpx.Client) -> dict:
    """One 5 s generation through the REST API with ``client`` (its cookies); the final video's FileData."""
    from packforcing import studio

    params = client.get(f"{base}gradio_api/info").json()["named_endpoints"]["/generate"]["parameters"]
    data = [p.get("parameter_default") for p in params]
    data[:5] = [PROMPT, studio.min_seconds(), 3, False, "window"]
    r = client.post(f"{base}gradio_api/call/generate", json={"data": data})
    r.raise_for_status()
    event = r.json()["event_id"]
    data = None
    with client.stream("GET", f"{base}gradio_api/call/generate/{event}", timeout=120) as stream:
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "complete":
                data = json.loads(line.split(":", 1)[1])
    assert data is not None, "no result"
    return data[2]  # the final video


@pytest.mark.parametrize("target", SECRET_FILES, ids=lambda p: p.name)
def test_no_server_file_comes_back_through_any_route_or_spelling(app_url, target):
    with httpx.Client() as client:
        client.get(f"{app_url}config")
        for prefix in routes(app_url):
            for name in spellings(target):
                r = client.get(prefix + name)
                assert r.status_code in (400, 403, 404, 405), (prefix + name, r.status_code)
                if target.exists() and len(target.read_bytes()) > 20:
                    assert target.read_bytes()[:200] not in r.content


def test_a_symlink_planted_in_the_cache_is_not_followed(app_url, tmp_path):
    import tempfile

    cache = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    cache.mkdir(parents=True, exist_ok=True)
    link = cache / f"planted-{os.getpid()}.txt"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/passwd")
    try:
        for prefix in routes(app_url):
            r = httpx.get(prefix + str(link))
            assert r.status_code in (400, 403, 404, 405) and b"root:" not in r.content
    finally:
        link.unlink(missing_ok=True)


def test_another_visitors_files_are_reachable_only_through_the_unguessable_url_given_to_them(app_url):
    """Gradio serves only files it created, under <cache>/<sha256(secret seed + content)>/: the URL a
    visitor receives is a capability (~2^122 guesses), not a path anyone can build. Everything else
    that names their files — the run directory, traversal into it, the cache directory — is refused."""
    from gradio.utils import HASH_SEED_PATH

    from packforcing import studio

    before = set(studio.runs_root().glob("packforcing-run-*"))
    with httpx.Client() as alice, httpx.Client() as bob:
        alice.get(f"{app_url}config")
        bob.get(f"{app_url}config")
        video = generate(app_url, alice)
        mine = alice.get(video["url"])
        assert mine.status_code == 200 and mine.content[4:8] == b"ftyp"  # an mp4
        (run_dir,) = set(studio.runs_root().glob("packforcing-run-*")) - before
        server_files = sorted(p for p in run_dir.rglob("*") if p.is_file())
        assert any(p.suffix == ".mp4" for p in server_files) and any(p.suffix == ".parquet" for p in server_files)
        cache_dir = Path(video["path"]).parent
        assert len(cache_dir.name) == 64  # the keyed hash in the URL
        for prefix in routes(app_url):
            for target in [*server_files, run_dir, cache_dir, Path(HASH_SEED_PATH)]:
                for name in spellings(target):
                    r = bob.get(prefix + name)
                    assert r.status_code in (400, 403, 404, 405), (prefix + name, r.status_code)
