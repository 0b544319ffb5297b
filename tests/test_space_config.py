"""The README front matter would deploy: checked against the Hub documentation's Spaces configuration
reference (https://huggingface.co/docs/hub/spaces-config-reference) and ZeroGPU page
(https://huggingface.co/docs/hub/spaces-zerogpu), as read on 2026-12-02 (hub-docs commit 242f4a1)."""

from __future__ import annotations

from pathlib import Path

import gradio
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from packforcing import configs, self_forcing

ROOT = Path(__file__).resolve().parents[1]
# spaces-config-reference.md: the accepted parameters
DOCUMENTED_KEYS = {
    "title", "emoji", "colorFrom", "colorTo", "sdk", "python_version", "sdk_version", "suggested_hardware",
    "suggested_storage", "app_file", "app_build_command", "app_port", "base_path", "fullWidth", "header",
    "short_description", "models", "datasets", "tags", "thumbnail", "pinned", "hf_oauth", "hf_oauth_scopes",
    "hf_oauth_expiration_minutes", "hf_oauth_authorized_org", "disable_embedding", "startup_duration_timeout",
    "custom_headers", "preload_from_hub",
}
COLOURS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
HARDWARE = {"cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "l40sx4", "l40sx8",
            "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large", "a100x4", "a100x8"}
# spaces-zerogpu.md, "Supported Versions"
ZEROGPU_PYTHON = {"3.12.12", "3.10.13"}
ZEROGPU_TORCH = {"2.8.0", "2.9.1", "2.10.0", "2.11.0"}


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def requirement(file: str, name: str) -> Requirement:
    for line in (ROOT / file).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and Requirement(line).name == name:
            return Requirement(line)
    raise AssertionError(f"{name} not in {file}")


def test_front_matter_uses_documented_keys_and_values():
    meta = front_matter()
    assert set(meta) <= DOCUMENTED_KEYS, set(meta) - DOCUMENTED_KEYS
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__  # the version the tests run
    assert (ROOT / meta["app_file"]).is_file()
    assert {meta["colorFrom"], meta["colorTo"]} <= COLOURS
    assert meta["suggested_hardware"] in HARDWARE
    assert isinstance(meta["python_version"], str) and meta["python_version"] in ZEROGPU_PYTHON


def test_both_repositories_are_preloaded_and_tagged():
    meta = front_matter()
    entries = {}
    for item in meta["preload_from_hub"]:  # "repo" (all files) or "repo file1,file2 [commit]"
        repo, *rest = item.split()
        entries[repo] = rest[0].split(",") if rest else None
    spec = self_forcing.SELF_FORCING_DMD
    assert entries[spec.base_repo] is None  # the whole diffusers repository: every file the loader reads
    assert entries[spec.checkpoint_repo] == [spec.checkpoint_file] == [configs.SELF_FORCING_FILE]
    assert set(spec.repos) <= set(meta["models"])


def test_torch_range_serves_zerogpu_and_our_cpu_machines():
    torch_req = requirement("requirements.txt", "torch")
    assert torch_req.specifier.contains("2.13.0")  # our CPU wheel
    assert any(torch_req.specifier.contains(v) for v in ZEROGPU_TORCH)
    pinned = requirement("pre-requirements.txt", "torch")  # read by Spaces only, before requirements.txt
    (spec,) = pinned.specifier
    assert spec.operator == "==" and spec.version in ZEROGPU_TORCH and torch_req.specifier.contains(spec.version)
    assert Version(spec.version) == max(Version(v) for v in ZEROGPU_TORCH)
    assert requirement("requirements.txt", "spaces")  # @spaces.GPU
    assert "ffmpeg" in (ROOT / "packages.txt").read_text().split()
