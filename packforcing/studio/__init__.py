"""The Studio's run logic, free of any UI: validation, a generation worker, policy comparison.

`app.py` only wires Gradio components to what is here, so everything below is testable without
a browser or a server:

- :func:`validate_request` turns raw UI values into a :class:`RunRequest` or raises
  :class:`StudioError` (a ``ValueError``) with a message meant for the user.
- :func:`device_stream` is the GPU entry point (``@spaces.GPU`` with a duration estimated from
  the requested length by :func:`gpu_duration`; a no-op off Hugging Face ZeroGPU). It yields
  CPU-only, picklable :class:`DeviceBlock` values (uint8 frames + the trace rows added by the
  block), because on ZeroGPU it runs in a forked process.
- :class:`GenerationWorker` runs one generation in a thread and reports through a queue one
  :class:`Update` per block (preview mp4 segment, progress, trace tables so far) and a final
  one (full mp4 + trace as Parquet and CSV in a per-run temporary directory). :meth:`stop`
  ends the run after the block in progress: the video produced so far is kept and the cache is
  freed (closing the pipeline's generator releases it).
- :class:`CompareRun` runs several policies with the same prompt, seed and duration, one after
  the other.
- :data:`RUNS` maps a UI session to its running worker, so a Stop click (another request)
  reaches the generation of the same session.

Modules by job: `models` (which models, cached pipelines), `requests` (validation, GPU duration),
`runs` (slots, run directories, the session registry), `worker` (GPU entry point, the worker),
`compare` (several policies in turn). This package re-exports their public names. For a public
Space, `admission` caps each client address's generations in Gradio's queue and stops waiting
ones, and `http_guard` (ASGI middleware) closes the upload routes and frees REST callers' preview
segments; `view` holds the page's HTML, styles and figures.
"""

from __future__ import annotations

# `spaces` must be imported before anything initialises CUDA (torch is imported below).
import spaces  # noqa: F401, I001

from ..knobs import (  # noqa: F401  (re-exported: the Studio's public surface)
    KNOB_SPECS, POLICY_ORDER, KnobSpec, StudioError, coerce_knob, introspect, knob_specs, policy_compresses,
    policy_knobs, policy_names, shown,
)
from ..pipeline import COMPRESSOR_MODES  # noqa: F401
from .models import (  # noqa: F401
    _PIPELINES, CHECKPOINT_NOTE, DEFAULT_MODEL, MAX_LOADED_MODELS, MODELS, ModelChoice, get_pipeline, max_seconds,
    min_seconds, model_choices, model_key,
)
from .requests import (  # noqa: F401
    GPU_MARGIN, GPU_MAX_DURATION_S, GPU_OVERHEAD_S, GPU_SECONDS_PER_BLOCK, MAX_PROMPT_CHARS, MAX_SEED, MIN_SECONDS,
    VIEW_UNITS, RunRequest, _request_duration, blocks_gpu_duration, gpu_duration, prompt_warning, random_seed,
    validate_request, validate_view,
)
from .runs import (  # noqa: F401
    _RUN_LOCK, MAX_SECONDS_ENV, RUN_DIR_PREFIX, RUN_MAX_AGE_S, RUNS, RUNS_DIR_ENV, RunRegistry, RunSlots,
    _set_active, active_run_dirs, cleanup_runs, new_run_dir, runs_root,
)
from .worker import (  # noqa: F401
    DeviceBlock, GenerationWorker, TableAccumulator, Update, device_stream, failure_message, run_generation,
)
from .compare import CompareRun  # noqa: F401, E402
