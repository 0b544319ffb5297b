"""Requests: raw UI values checked into a `RunRequest` (or a `StudioError` meant for the user), and
the ZeroGPU duration a request asks for."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import safety
from ..cache import POLICIES
from ..knobs import StudioError, coerce_knob, introspect, policy_compresses, policy_names, shown
from ..inputs import MAX_PROMPT_CHARS, check_seed  # one prompt limit: the library's
from ..pipeline import COMPRESSOR_MODES
from ..sampler import PROMPT_SWITCHES
from ..schedule import MAX_PROMPTS, PromptSchedule
from .models import DEFAULT_MODEL, get_pipeline, max_seconds, min_seconds, model_key
from .runs import MAX_SECONDS_ENV

MIN_SECONDS = safety.DEFAULT_MIN_SECONDS  # the default; PACKFORCING_MIN_SECONDS may lower it (see min_seconds)
MAX_SEED = 2**31 - 1  # what a random seed is drawn from (any seed in [0, 2**63) is accepted)

# ZeroGPU duration estimate (seconds of GPU time requested per call).
GPU_OVERHEAD_S = 20.0  # moving weights, warm-up, writing the video
GPU_SECONDS_PER_BLOCK = 1.2  # Wan2.1-1.3B, 4-frame blocks, 4 steps + commit, on an H100/H200
GPU_MARGIN = 1.5
GPU_MAX_DURATION_S = 900


# ---- requests ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunRequest:
    """A validated generation request (picklable: it crosses into the GPU process on ZeroGPU)."""

    prompt: str
    seconds: float
    seed: int
    policy: str
    options: Mapping[str, Any]
    compressor_mode: str | None
    model: str
    num_blocks: int
    fps: int
    schedule: tuple[tuple[float, str], ...] = ()  # later prompts: (start second > 0, prompt)
    prompt_switch: str = "keep"  # at a switch: "keep" the cache or "recache" it

    def with_policy(self, policy: str, options: Mapping[str, Any] | None = None) -> RunRequest:
        return validate_request(self.prompt, self.seconds, self.seed, policy, options or {},
                                self.compressor_mode, self.model, schedule=list(self.schedule),
                                prompt_switch=self.prompt_switch)

    @property
    def prompts(self):
        """What the pipeline gets: the prompt, or a `PromptSchedule` when the prompt changes."""
        if not self.schedule:
            return self.prompt
        return PromptSchedule(((0.0, self.prompt), *self.schedule))

    @property
    def label(self) -> str:
        return f"{self.policy}, seed {self.seed}, {self.seconds:g} s"


def random_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


def prompt_warning(prompt: str, model: str = DEFAULT_MODEL) -> str | None:
    """A non-fatal note about a prompt (e.g. words the embedded tiny world does not know)."""
    if model != "embedded" or not isinstance(prompt, str) or not prompt.strip():
        return None
    from ..tiny_world import tiny_world_name
    from ..world.captions import parse_caption
    from ..world.spec import check_prompt_in_world

    from ..world.memory import parse_memory_caption

    world = tiny_world_name()
    try:
        objects, background = parse_caption(prompt)
        if world is not None:
            check_prompt_in_world(objects, background, world)
    except ValueError as err:
        try:  # a colour-free caption: the memory test (the model picks the colour)
            shapes, background = parse_memory_caption(prompt)
        except ValueError:
            return f"The embedded tiny-world model only knows simple scenes; {err}"
        try:
            if world is not None:
                check_prompt_in_world([("white", s) for s in shapes], background, world)
        except ValueError as world_err:
            return f"The embedded tiny-world model only knows simple scenes; {world_err}"
    return None


def validate_request(
    prompt,
    seconds,
    seed,
    policy: str,
    options: Mapping[str, Any] | None = None,
    compressor_mode: str | None = None,
    model: str = DEFAULT_MODEL,
    randomize_seed: bool = False,
    schedule=None,
    prompt_switch="keep",
) -> RunRequest:
    """Check raw UI values; raise :class:`StudioError` with a clear message on the first bad one.

    ``schedule``: later prompts as rows ``[seconds, prompt]`` (a list, Gradio's table payload or a
    DataFrame; blank rows are ignored); ``prompt`` is the prompt from 0 s.

    ``options`` may hold knobs of other policies (a UI sends all of them): only the knobs the
    chosen policy accepts are kept. The policy is built once (no allocation) so that option
    errors (e.g. frames that are not whole blocks) surface before the run starts.
    """
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise StudioError("Please enter a prompt: it is empty.")
    if not isinstance(prompt, str):
        raise StudioError(f"The prompt must be text, got {type(prompt).__name__}.")
    prompt = " ".join(prompt.split())
    if len(prompt) > MAX_PROMPT_CHARS:
        raise StudioError(f"The prompt is too long ({len(prompt)} characters; at most {MAX_PROMPT_CHARS}).")
    limit, shortest = max_seconds(), min_seconds()
    try:
        if isinstance(seconds, bool):
            raise TypeError
        seconds = float(seconds)
    except OverflowError:  # an int beyond float range
        seconds = math.inf
    except (TypeError, ValueError):
        raise StudioError(f"The duration must be a number of seconds, got {shown(seconds)}.") from None
    if not math.isfinite(seconds) or not shortest <= seconds <= limit:
        raise StudioError(
            f"The duration must be between {shortest:g} and {limit:g} seconds, got {seconds:g}."
            + ("" if seconds <= limit or not math.isfinite(seconds)
               else f" Longer videos can be enabled with the {MAX_SECONDS_ENV} setting."))
    if randomize_seed is not None and not isinstance(randomize_seed, (bool, np.bool_)):
        raise StudioError(f"randomize_seed must be true or false, got {shown(randomize_seed)}.")
    if randomize_seed:
        seed = random_seed()
    raw_seed = seed
    try:
        if isinstance(seed, str):
            seed = float(seed.strip())
        if isinstance(seed, (float, np.floating)) and float(seed).is_integer():
            seed = int(seed)
        seed = check_seed(seed)
    except (TypeError, ValueError, OverflowError):
        raise StudioError(f"The seed must be a whole number between 0 and 2^63 - 1, got {shown(raw_seed)}.") from None
    if not isinstance(policy, str) or policy not in POLICIES:
        raise StudioError(f"Unknown cache policy {shown(policy)}; choose from {policy_names()}.")
    model = model_key(model)
    pipe = get_pipeline(model)
    accepted = introspect(policy)
    chosen = {k: coerce_knob(policy, k, v, *accepted[k], block_frames=pipe.block_frames)
              for k, v in (options or {}).items() if k in accepted}
    chosen = {k: v for k, v in chosen.items() if v is not None}  # None = the policy's derived/automatic default
    if compressor_mode is not None and compressor_mode not in COMPRESSOR_MODES:
        raise StudioError(f"Unknown compressor branch {shown(compressor_mode)}; choose from {list(COMPRESSOR_MODES)}.")
    if not policy_compresses(policy):
        compressor_mode = None
    try:
        num_blocks = pipe.num_blocks(seconds)
        pipe.build_policy(policy, compressor_mode=compressor_mode, **chosen)
        pipe.check_cache_memory(policy, num_blocks, **chosen)
    except (TypeError, ValueError) as err:
        raise StudioError(f"Cache policy {policy!r}: {err}") from None
    later = schedule_rows(schedule)
    if prompt_switch is None:
        prompt_switch = "keep"
    if prompt_switch not in PROMPT_SWITCHES:
        raise StudioError(f"prompt_switch must be one of {list(PROMPT_SWITCHES)}, got {shown(prompt_switch)}.")
    if later:
        try:
            full = PromptSchedule(((0.0, prompt), *later))
            full.switch_blocks(pipe.block_starts(num_blocks), seconds)
        except ValueError as err:
            raise StudioError(f"Prompt schedule: {err}.") from None
    return RunRequest(prompt, seconds, seed, policy, dict(chosen), compressor_mode, model, num_blocks, pipe.fps,
                      tuple(later), prompt_switch)


def _blank(value) -> bool:
    """An empty table cell: None, NaN or whitespace."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str)
                                                                                 and not value.strip())


def schedule_rows(value) -> list[tuple[float, str]]:
    """Rows ``[seconds, prompt]`` of the prompt-schedule table -> [(seconds, prompt)], blank rows dropped.
    Accepts a list of rows, Gradio's table payload ``{"data": rows, ...}`` or a DataFrame."""
    if value is None:
        return []
    if hasattr(value, "values") and hasattr(value, "columns"):  # a DataFrame
        value = value.values.tolist()
    elif isinstance(value, Mapping):
        value = value.get("data") or []
    if not isinstance(value, (list, tuple)):
        raise StudioError(f"The prompt schedule must be a table of [seconds, prompt] rows, got {shown(value)}.")
    rows = []
    for number, row in enumerate(value, start=1):
        if not isinstance(row, (list, tuple)) or len(row) != 2:
            raise StudioError(f"Prompt schedule row {number} must be [seconds, prompt], got {shown(row)}.")
        seconds, text = row
        if _blank(seconds) and _blank(text):
            continue
        try:
            if isinstance(seconds, bool):
                raise TypeError
            seconds = float(seconds.strip() if isinstance(seconds, str) else seconds)
        except (TypeError, ValueError):
            raise StudioError(f"Prompt schedule row {number}: the time must be a number of seconds, got "
                              f"{shown(seconds)}.") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise StudioError(f"Prompt schedule row {number}: the time must be after 0 s (the prompt above is the "
                              f"one at 0 s), got {shown(seconds)}.")
        if not isinstance(text, str) or not text.strip():
            raise StudioError(f"Prompt schedule row {number}: the prompt is empty.")
        text = " ".join(text.split())
        if len(text) > MAX_PROMPT_CHARS:
            raise StudioError(f"Prompt schedule row {number}: the prompt is too long ({len(text)} characters; at most "
                              f"{MAX_PROMPT_CHARS}).")
        rows.append((seconds, text))
    if len(rows) + 1 > MAX_PROMPTS:
        raise StudioError(f"The prompt schedule has {len(rows) + 1} prompts; at most {MAX_PROMPTS}.")
    return sorted(rows)


def gpu_duration(seconds: float, per_block: float = GPU_SECONDS_PER_BLOCK, overhead: float = GPU_OVERHEAD_S,
                 block_seconds: float = 1.0) -> int:
    """ZeroGPU seconds to request for a video of ``seconds``: overhead + blocks × per-block time × margin.

    ``block_seconds`` is the video one block adds (`Pipeline.block_seconds`: VAE temporal ratio ×
    latent frames per block / fps; 4·4/16 = 1 s for 4-frame blocks at 16 fps).
    5 s -> 29 s, 60 s -> 128 s, 120 s -> 236 s (capped at 900 s).
    """
    return blocks_gpu_duration(max(1, math.ceil(float(seconds) / block_seconds)), per_block, overhead)


def blocks_gpu_duration(blocks: int, per_block: float = GPU_SECONDS_PER_BLOCK, overhead: float = GPU_OVERHEAD_S) -> int:
    """ZeroGPU seconds to request for ``blocks`` blocks (see `gpu_duration`)."""
    return int(min(GPU_MAX_DURATION_S, math.ceil(overhead + blocks * per_block * GPU_MARGIN)))


COMMIT_PASS_SHARE = 0.25  # a re-cached block costs one commit pass: about a quarter of a block (4 steps + commit)


def _request_duration(request: RunRequest, *args, **kwargs) -> int:
    """The model's own blocks (its fps, VAE ratio, block size), plus the commit passes re-caching
    re-runs at each switch (one per block before it)."""
    blocks = float(request.num_blocks)
    if request.prompt_switch == "recache":
        blocks += sum(COMMIT_PASS_SHARE * request.num_blocks * t / request.seconds for t, _ in request.schedule)
    return blocks_gpu_duration(math.ceil(blocks))


VIEW_UNITS = ("tokens", "MB")


def validate_view(occ_layer, occ_unit, topk_layer, rope_layer, num_layers: int) -> dict[str, str]:
    """The analysis controls that travel with a request, checked (None: the control's default).

    A layer is ``"mean"`` (not for the RoPE map) or a layer index in ``[0, num_layers)``; the unit
    is ``"tokens"`` or ``"MB"``. Raises :class:`StudioError` naming the field."""
    def layer(name, value, default, mean=True):
        if value is None:
            return default
        if mean and value == "mean":
            return "mean"
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = str(int(value))
        if not (isinstance(value, str) and value.isdigit() and int(value) < num_layers):
            choices = (["mean"] if mean else []) + [f"0…{num_layers - 1}"]
            raise StudioError(f"{name} must be one of {', '.join(choices)}, got {shown(value)}.")
        return str(int(value))

    if occ_unit is not None and occ_unit not in VIEW_UNITS:
        raise StudioError(f"occ_unit must be one of {list(VIEW_UNITS)}, got {shown(occ_unit)}.")
    return {"occ_layer": layer("occ_layer", occ_layer, "mean"), "occ_unit": occ_unit or "tokens",
            "topk_layer": layer("topk_layer", topk_layer, "mean"),
            "rope_layer": layer("rope_layer", rope_layer, "0", mean=False)}
