"""Limits and checks for a public deployment (a Hugging Face Space open to anyone).

Everything an operator can set comes from environment variables, read at call time, with safe
defaults; an invalid value is ignored with a warning (the default applies), never trusted:

==============================  =========================================  =================
variable                        meaning                                    default
==============================  =========================================  =================
``PACKFORCING_MAX_SECONDS``     longest video a request may ask for        120 (>= min)
``PACKFORCING_MIN_SECONDS``     shortest video a request may ask for       5 (1 .. max)
``PACKFORCING_CONCURRENCY``     generations running at once (per process)  1 (1 .. 16)
``PACKFORCING_QUEUE_SIZE``      requests waiting in the Gradio queue       64 (1 .. 10,000)
``PACKFORCING_ALLOWED_MODELS``  comma-separated hub ids the model field    none
                                accepts (``embedded`` is always allowed)
``PACKFORCING_MODELS_DIR``      directory whose sub-directories the model  unset: no local paths
                                field may name (relative paths only)
``PACKFORCING_RUNS_DIR``        where per-run directories are created      the system temp dir
``PACKFORCING_RUN_TTL_S``       age after which finished runs' files are   21,600 (6 h; >= 60)
                                deleted
``PACKFORCING_JOBS_PER_CLIENT`` generations one client address may have   2 (1 .. 1,000)
                                queued or running at once
``PACKFORCING_TRUSTED_PROXIES`` proxies in front of the app whose          1 on a Space
                                ``X-Forwarded-For`` entry is trusted       (``SPACE_ID`` set),
                                (the client address is the entry that      else 0 (0 .. 8)
                                many hops from the right)
``PACKFORCING_DISK_CAP_MB``     disk the run directories and Gradio's      2,048 (10 .. 10^7)
                                cache may hold: oldest finished runs go
                                first
``PACKFORCING_MAX_UPLOAD_MB``   largest request file Gradio accepts (its   32 (0.001 .. 1,024)
                                ``max_file_size``): the Replay tab's trace
                                and video
``PACKFORCING_UPLOADS``         1: the Replay tab takes uploaded files;    1 (0 or 1)
                                0: upload route closed (replay of the
                                shipped examples only)
==============================  =========================================  =================

`resolve_model` is the only way a user string becomes a model to load: it accepts the embedded
model, an allow-listed hub id (loaded from the local Hugging Face cache only, never downloaded on
request), or a directory strictly inside ``PACKFORCING_MODELS_DIR`` (no ``..``, no absolute paths
outside it, no symlink leading out of it). Nothing here runs a shell: no user string ever
reaches one (tests/test_bad_inputs.py scans the sources for shell calls).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

MAX_SECONDS_ENV = "PACKFORCING_MAX_SECONDS"
MIN_SECONDS_ENV = "PACKFORCING_MIN_SECONDS"
CONCURRENCY_ENV = "PACKFORCING_CONCURRENCY"
QUEUE_SIZE_ENV = "PACKFORCING_QUEUE_SIZE"
ALLOWED_MODELS_ENV = "PACKFORCING_ALLOWED_MODELS"
MODELS_DIR_ENV = "PACKFORCING_MODELS_DIR"
RUNS_DIR_ENV = "PACKFORCING_RUNS_DIR"
RUN_TTL_ENV = "PACKFORCING_RUN_TTL_S"
JOBS_PER_CLIENT_ENV = "PACKFORCING_JOBS_PER_CLIENT"
TRUSTED_PROXIES_ENV = "PACKFORCING_TRUSTED_PROXIES"
MAX_UPLOAD_MB_ENV = "PACKFORCING_MAX_UPLOAD_MB"
DISK_CAP_MB_ENV = "PACKFORCING_DISK_CAP_MB"
UPLOADS_ENV = "PACKFORCING_UPLOADS"

DEFAULT_MAX_SECONDS = 120.0
DEFAULT_MIN_SECONDS = 5.0
ABS_MIN_SECONDS = 1.0
DEFAULT_CONCURRENCY = 1
MAX_CONCURRENCY = 16
DEFAULT_QUEUE_SIZE = 64
DEFAULT_RUN_TTL_S = 6 * 3600.0
MIN_RUN_TTL_S = 60.0
DEFAULT_DISK_CAP_MB = 2048.0
DEFAULT_JOBS_PER_CLIENT = 2
MAX_TRUSTED_PROXIES = 8
DEFAULT_MAX_UPLOAD_MB = 32.0  # a 2-minute run's trace + video

EMBEDDED = "embedded"
# none by default: the one hub model that makes sense for a few-step causal rollout is the named
# Self-Forcing model (offered when cached); the base Wan2.1 weights are a 50-step bidirectional model
DEFAULT_ALLOWED_MODELS: tuple[str, ...] = ()
MAX_MODEL_CHARS = 256
# owner/name as the Hub spells them (letters, digits, '-', '_', '.'; no '..', no leading '.')
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class UnsafeInput(ValueError):
    """A user value refused for safety (a model outside the allow-list, a path escaping its root)."""


# ---- environment ---------------------------------------------------------------------------------
def env_number(name: str, default: float, minimum: float, maximum: float = math.inf, integer: bool = False) -> float:
    """``float(os.environ[name])`` if it is a finite number in [minimum, maximum], else ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not a number; using %g", name, raw, default)
        return default
    if not math.isfinite(value) or not minimum <= value <= maximum or (integer and not value.is_integer()):
        kind = "a whole number" if integer else "a number"
        log.warning("ignoring %s=%r: must be %s in [%g, %g]; using %g", name, raw, kind, minimum, maximum, default)
        return default
    return value


def max_seconds() -> float:
    """Longest video a request may ask for (``PACKFORCING_MAX_SECONDS``, default 120 s)."""
    return env_number(MAX_SECONDS_ENV, DEFAULT_MAX_SECONDS, DEFAULT_MIN_SECONDS)


def min_seconds() -> float:
    """Shortest video a request may ask for (``PACKFORCING_MIN_SECONDS``, default 5 s, at least 1 s)."""
    return min(env_number(MIN_SECONDS_ENV, DEFAULT_MIN_SECONDS, ABS_MIN_SECONDS), max_seconds())


def concurrency_limit() -> int:
    """Generations that may run at once in this process (``PACKFORCING_CONCURRENCY``, default 1)."""
    return int(env_number(CONCURRENCY_ENV, DEFAULT_CONCURRENCY, 1, MAX_CONCURRENCY, integer=True))


def queue_size() -> int:
    """Requests that may wait in the Gradio queue (``PACKFORCING_QUEUE_SIZE``, default 64)."""
    return int(env_number(QUEUE_SIZE_ENV, DEFAULT_QUEUE_SIZE, 1, 10_000, integer=True))


def run_ttl_s() -> float:
    """Seconds a finished run's files are kept (``PACKFORCING_RUN_TTL_S``, default 6 h, at least 60 s)."""
    return env_number(RUN_TTL_ENV, DEFAULT_RUN_TTL_S, MIN_RUN_TTL_S)


def disk_cap_bytes() -> int:
    """Bytes the run directories and Gradio's cache may hold (``PACKFORCING_DISK_CAP_MB``, default
    2,048 MiB); beyond it the oldest finished runs are removed first (`studio.runs.cleanup_runs`)."""
    return int(env_number(DISK_CAP_MB_ENV, DEFAULT_DISK_CAP_MB, 10.0, 1e7) * 2**20)


def jobs_per_client() -> int:
    """Generations (Generate or Compare) one client address may have queued or running at once
    (``PACKFORCING_JOBS_PER_CLIENT``, default 2)."""
    return int(env_number(JOBS_PER_CLIENT_ENV, DEFAULT_JOBS_PER_CLIENT, 1, 1000, integer=True))


def trusted_proxies() -> int:
    """Proxies in front of the app (``PACKFORCING_TRUSTED_PROXIES``; default 1 on a Hugging Face
    Space, where ``SPACE_ID`` is set, else 0): how many ``X-Forwarded-For`` entries, from the
    right, were written by proxies this deployment trusts."""
    default = 1 if os.environ.get("SPACE_ID") else 0
    return int(env_number(TRUSTED_PROXIES_ENV, default, 0, MAX_TRUSTED_PROXIES, integer=True))


def max_upload_bytes() -> int:
    """Largest file a request may carry, in bytes (``PACKFORCING_MAX_UPLOAD_MB``, default 32 MiB):
    Gradio's ``max_file_size``."""
    return int(env_number(MAX_UPLOAD_MB_ENV, DEFAULT_MAX_UPLOAD_MB, 0.001, 1024) * 2**20)


def uploads_enabled() -> bool:
    """Whether the Replay tab takes uploaded files (``PACKFORCING_UPLOADS``, default 1)."""
    return bool(env_number(UPLOADS_ENV, 1, 0, 1, integer=True))


def runs_dir() -> Path | None:
    raw = os.environ.get(RUNS_DIR_ENV, "").strip()
    return Path(raw) if raw else None


# ---- models ---------------------------------------------------------------------------------------
def allowed_models() -> tuple[str, ...]:
    """Hub ids the model field accepts (``PACKFORCING_ALLOWED_MODELS``); malformed entries are dropped."""
    raw = os.environ.get(ALLOWED_MODELS_ENV)
    if raw is None:
        return DEFAULT_ALLOWED_MODELS
    out = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry or entry == EMBEDDED:
            continue
        if HUB_ID.match(entry) and ".." not in entry:
            out.append(entry)
        else:
            log.warning("ignoring %r in %s: not a hub id (owner/name)", entry, ALLOWED_MODELS_ENV)
    return tuple(dict.fromkeys(out))


def models_dir() -> Path | None:
    """The directory local models may be chosen from (``PACKFORCING_MODELS_DIR``), resolved; None = none."""
    raw = os.environ.get(MODELS_DIR_ENV, "").strip()
    if not raw:
        return None
    root = Path(raw).expanduser().resolve()
    if not root.is_dir():
        log.warning("ignoring %s=%r: not a directory", MODELS_DIR_ENV, raw)
        return None
    return root


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A model the Studio may load. ``kind``: embedded | hub | local; ``source``: hub id or resolved path."""

    kind: str
    source: str

    @property
    def key(self) -> str:
        return self.source if self.kind != EMBEDDED else EMBEDDED


def resolve_model(value) -> ModelRef:
    """The model a user string names, or `UnsafeInput` with the reason.

    Accepted: ``"embedded"``; a hub id listed in `allowed_models`; a path *relative to*
    `models_dir` (or an absolute one inside it) that resolves, symlinks followed, to an existing
    directory inside it. Refused: anything else, e.g. ``/etc/passwd``, ``../x``, a symlink out.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return ModelRef(EMBEDDED, EMBEDDED)
    if not isinstance(value, str):
        raise UnsafeInput(f"the model must be a name, got {type(value).__name__}")
    value = value.strip()
    if len(value) > MAX_MODEL_CHARS:
        raise UnsafeInput(f"the model name is too long ({len(value)} characters; at most {MAX_MODEL_CHARS})")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise UnsafeInput("the model name contains control characters")
    if value == EMBEDDED:
        return ModelRef(EMBEDDED, EMBEDDED)
    allowed = allowed_models()
    if value in allowed:
        return ModelRef("hub", value)
    root = models_dir()
    choices = [EMBEDDED, *allowed]
    if root is None:
        raise UnsafeInput(f"unknown model {value!r}: choose one of {choices} (local model paths are disabled: "
                          f"{MODELS_DIR_ENV} is not set)")
    parts = Path(value).parts
    if ".." in parts or "\\" in value:
        raise UnsafeInput(f"refused model path {value!r}: '..' and backslashes are not allowed")
    candidate = Path(value)
    if not candidate.is_absolute():
        candidate = root / candidate
    elif not candidate.is_relative_to(root):  # refused before touching the file system
        raise UnsafeInput(f"refused model path {value!r}: it is outside the models directory")
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise UnsafeInput(f"unknown model {value!r}: not one of {choices} and no such model in the models "
                          f"directory") from None
    if resolved == root or not resolved.is_relative_to(root):
        raise UnsafeInput(f"refused model path {value!r}: it is outside the models directory")
    if not resolved.is_dir():
        raise UnsafeInput(f"refused model path {value!r}: a model is a directory (diffusers format)")
    return ModelRef("local", str(resolved))


def model_choices() -> list[str]:
    """What a model dropdown lists: the embedded model and the allow-listed hub ids."""
    return [EMBEDDED, *allowed_models()]


# ---- messages ---------------------------------------------------------------------------------------
# an absolute POSIX path not inside a word, a URL or a label already substituted
_ABSOLUTE_PATH = re.compile(r"(?<![\w<>.~/:-])/(?:[\w.@+=,-]+/)*[\w.@+=,-]*")


def _server_roots() -> list[tuple[str, str]]:
    """(absolute directory, label) for the server locations an error may mention, most specific first."""
    import sys
    import tempfile

    roots: dict[str, str] = {}

    def add(path, label: str) -> None:
        if not path:
            return
        for form in {str(Path(path)), str(Path(path).resolve())}:
            if form != "/":
                roots.setdefault(form.rstrip("/"), label)

    add(models_dir(), "<models>")
    try:
        from huggingface_hub import constants

        add(constants.HF_HUB_CACHE, "<hf-cache>")
        add(constants.HF_HOME, "<hf-home>")
    except ImportError:  # pragma: no cover (a dependency)
        pass
    add(runs_dir(), "<runs>")
    add(Path(__file__).resolve().parents[1], "<app>")
    add(sys.prefix, "<python>")
    add(sys.base_prefix, "<python>")
    add(tempfile.gettempdir(), "<tmp>")
    add(Path.home(), "<home>")
    return sorted(roots.items(), key=lambda item: -len(item[0]))


def public_text(text: str) -> str:
    """``text`` with every server path masked, for a message a visitor reads: paths inside known
    directories (models dir, Hugging Face cache, runs dir, the app, Python, temp, home) keep their
    part below it (``<hf-cache>/models--x/...``); any other absolute path keeps its last part only
    (``<path>/passwd``)."""
    text = str(text)
    for root, label in _server_roots():
        text = re.sub(re.escape(root) + r"(?=/|\b|$)", label, text)
    return _ABSOLUTE_PATH.sub(lambda m: "<path>/" + m.group(0).rstrip("/").rsplit("/", 1)[-1]
                              if len(m.group(0)) > 1 else m.group(0), text)
