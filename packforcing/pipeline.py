"""The text-to-video pipeline: text encoder + causal transformer + cache policy + VAE + compressor.
(Input checks live in `packforcing.inputs`, video arrays and files in `packforcing.video`.)

`Pipeline.stream` is the generator a UI iterates (one `BlockResult` per block, with decoded
pixels); `Pipeline.generate` collects it into a uint8 video. Durations map to blocks as
``num_blocks = max(1, round(seconds · fps / (4 · block_frames)))``: a block of B_f latent frames
adds 4·B_f pixel frames (the first block 4·B_f − 3), so 5 s at 16 fps with 4-frame blocks is
5 blocks = 20 latent frames = 77 pixel frames, and 120 s is 120 blocks = 1,917 pixel frames.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from .cache import POLICIES, CacheGeometry, make_policy
from .cache.config import check_number, knob_kind
from .compressor import Compressor
from .configs import TINY
from .devices import available_memory
from .inputs import MAX_PROMPT_CHARS, check_prompt, check_seed  # noqa: F401  (re-exported)
from .model import CausalWanTransformer
from .sampler import SamplerConfig, block_frame_ranges, generate_blocks
from .schedule import PromptSchedule
from .vae import WanVAE, tiny_vae_config
from .video import to_uint8, write_video  # noqa: F401  (re-exported)

DEFAULT_MAX_SECONDS = 120.0
COMPRESSOR_MODES = ("lr", "hr", "both")
# Policy option limits live on the policies' config dataclasses (`packforcing.cache.config`);
# `Pipeline.check_cache_memory` then compares what the settings would really allocate with the
# memory that is free.
MIN_COMPRESSED_LATENT = 8  # compressing policies: both compressor branches need latent frames >= 8x8
MEMORY_HEADROOM = 0.9  # a cache may take at most this share of the free memory


class Pipeline:
    """Everything needed to turn a prompt into a video, at one resolution."""

    def __init__(
        self,
        transformer: CausalWanTransformer,
        vae: WanVAE,
        text_encoder,
        compressor: Compressor | None = None,
        height: int = 128,
        width: int = 128,
        fps: int = 16,
        sampler: SamplerConfig | None = None,
        name: str = "custom",
        max_seconds: float = DEFAULT_MAX_SECONDS,
        text_offload: bool = False,
    ):
        """``text_offload``: keep the text encoder on the CPU and move it to the transformer's device
        only while a prompt is encoded (UMT5-XXL is 11 GB in bf16: DESIGN §8's memory budget)."""
        self.transformer = transformer.eval()
        self.vae = vae
        self.text_encoder = text_encoder
        self.dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.compressor = compressor.eval() if compressor is not None else Compressor(self.dim, mode="lr")
        ratio = vae.spatial_ratio * 2  # VAE × patch
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in (height, width)):
            raise ValueError(f"height and width must be positive whole pixels, got {height!r}x{width!r}")
        if height % ratio or width % ratio:
            raise ValueError(f"height and width must be multiples of {ratio}, got {height}x{width}")
        self.height, self.width, self.fps = height, width, fps
        self.sampler = sampler or SamplerConfig()
        self.name = name
        self.max_seconds = max_seconds
        self.text_offload = text_offload
        self._text_lock = threading.Lock()  # one prompt encode (and device move) at a time

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def tiny_random(cls, seed: int = 0, height: int = 128, width: int = 128) -> "Pipeline":
        """A tiny pipeline of the real architecture with *random* weights (noise videos).

        Stands in until the trained embedded model exists; useful for tests and benchmarks.
        """
        from .text import TinyTextEncoder
        from .world import vocabulary

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = CausalWanTransformer(**TINY)
            vae = WanVAE(AutoencoderKLWan(**tiny_vae_config()).eval())
            dim = TINY["num_attention_heads"] * TINY["attention_head_dim"]
            compressor = Compressor(dim, mode="both")
        captions = [" ".join(vocabulary())]
        text = TinyTextEncoder.build(captions, text_dim=TINY["text_dim"], seed=seed)
        return cls(transformer, vae, text, compressor, height, width, name="tiny (random weights)")

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        self_forcing_checkpoint: str | Path | None = None,
        compressor_path: str | Path | None = None,
        height: int = 480,
        width: int = 832,
        block_frames: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        local_files_only: bool = True,
        max_seconds: float = DEFAULT_MAX_SECONDS,
    ) -> "Pipeline":
        """A Wan2.1 pipeline from a diffusers-format directory or hub id (transformer, vae,
        text_encoder, tokenizer), optionally with the transformer weights replaced by a Self-Forcing
        ``.pt`` checkpoint (which also switches to its 3-latent-frame blocks unless ``block_frames``
        is given). Without ``compressor_path`` PackForcing runs zero-shot (LR branch only).
        Loading is strict and safe (see `packforcing.loading`); nothing is downloaded when
        ``local_files_only``.
        """
        from .loading import load_compressor, load_wan_pipeline_components

        parts = load_wan_pipeline_components(
            path_or_hub_id, local_files_only=local_files_only, model_cls=CausalWanTransformer, dtype=dtype,
            transformer_checkpoint=self_forcing_checkpoint, device=device,
        )
        transformer = parts.transformer
        if self_forcing_checkpoint is not None:
            block_frames = block_frames or 3
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        compressor = load_compressor(compressor_path, dim) if compressor_path else Compressor(dim, mode="lr")
        sampler = SamplerConfig(block_frames=block_frames or 4)
        name = f"{path_or_hub_id}" + (f" + {Path(self_forcing_checkpoint).name}" if self_forcing_checkpoint else "")
        offload = torch.device(device).type != "cpu"
        text_encoder = parts.text_encoder.to("cpu" if offload else device)
        pipe = cls(transformer.to(device), WanVAE(parts.vae.to(device)), text_encoder, compressor.to(device),
                   height, width, sampler=sampler, name=name, max_seconds=max_seconds, text_offload=offload)
        return pipe

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "Pipeline":
        """Move the transformer (optionally cast to ``dtype``), VAE and compressor to ``device``.
        The text encoder stays where it is; prompts are encoded there and moved (DESIGN §8)."""
        self.transformer.to(device=device, dtype=dtype) if dtype is not None else self.transformer.to(device)
        self.vae.vae.to(device)
        self.compressor.to(device)
        return self

    # -- geometry ----------------------------------------------------------------------------
    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae.spatial_ratio, self.width // self.vae.spatial_ratio

    @property
    def block_frames(self) -> int:
        return self.sampler.block_frames

    @property
    def block_seconds(self) -> float:
        """Seconds of video one block adds (after the first): temporal ratio × block frames / fps."""
        return self.vae.temporal_ratio * self.block_frames / self.fps

    @property
    def compressed_grid(self) -> tuple[int, int, int]:
        """(t, h, w) cells of one block's compressed tokens (N_c = t·h·w)."""
        return tuple(int(n) for n in Compressor.output_grid(self.block_frames, *self.latent_hw))

    def geometry(self, batch_size: int = 1) -> CacheGeometry:
        cfg = self.transformer.config
        _, gh, gw = self.transformer.token_grid(1, *self.latent_hw)
        return CacheGeometry(
            cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, self.block_frames, (gh, gw),
            batch_size=batch_size, dtype=self.transformer.dtype, device=self.transformer.device,
        )

    def num_blocks(self, seconds: float) -> int:
        """Blocks for a requested duration; raises ValueError outside (0, max_seconds]."""
        try:
            if isinstance(seconds, bool):
                raise TypeError
            seconds = float(seconds)
        except OverflowError:  # an int beyond float range
            seconds = math.inf if seconds > 0 else -math.inf
        except (TypeError, ValueError):
            raise ValueError(f"duration must be a number of seconds, got {seconds!r}") from None
        if not math.isfinite(seconds):
            raise ValueError(f"duration must be a positive, finite number of seconds, got {seconds}")
        if seconds <= 0:
            raise ValueError(f"duration must be a positive number of seconds, got {seconds:g}")
        if seconds > self.max_seconds:
            raise ValueError(f"duration {seconds:g} s exceeds the maximum of {self.max_seconds:g} s")
        return max(1, round(seconds * self.fps / (self.vae.temporal_ratio * self.block_frames)))

    def compressor_for(self, mode: str | None) -> Compressor:
        """The compressor in ``mode`` ('lr' = zero-shot, no trained weights; 'hr'/'both' need HR)."""
        if mode is None or mode == self.compressor.mode:
            return self.compressor
        if mode not in COMPRESSOR_MODES:
            raise ValueError(f"unknown compressor mode {mode!r}; choose from {COMPRESSOR_MODES}")
        if mode != "lr" and self.compressor.hr is None:
            raise ValueError(f"compressor mode {mode!r} needs HR-branch weights, which this model lacks")
        alt = Compressor(self.dim, mode=mode, widths=self.compressor.widths).to(self.transformer.device).eval()
        if alt.hr is not None:
            alt.hr.load_state_dict(self.compressor.hr.state_dict())
        return alt

    def check_policy_options(self, name, options: dict) -> dict:
        """Validate a policy name and the types and ranges of its options (before anything is built).

        The limits live on the policy's config dataclass (field metadata, `packforcing.cache.config`):
        counting options must be whole numbers in range (4.0 is taken as 4, 2.5 and True are
        refused); flags must be booleans. Returns the options normalised. Whether a value fits the
        policy (whole blocks, at least one block of window...) is checked by the policy itself."""
        if not isinstance(name, str) or name not in POLICIES:
            raise ValueError(f"unknown cache policy {name!r}; choose from {sorted(POLICIES)}")
        fields = {f.name: f for f in dataclasses.fields(POLICIES[name].config_class)}
        out = {}
        for key, value in options.items():
            f = fields.get(key)
            kind = knob_kind(f) if f is not None else None
            if kind in ("int", "float") and value is not None:
                if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
                    value = int(value)
                if isinstance(value, np.integer):
                    value = int(value)
                check_number(f, value, self.geometry().tokens_per_frame)
            elif kind == "bool" and not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{key} must be true or false, got {value!r}")
            out[key] = bool(value) if kind == "bool" else value
        return out

    def cache_bytes(self, name: str, num_blocks: int, **options) -> int:
        """Bytes the policy's buffers take for a ``num_blocks`` video (allocated on the meta device:
        nothing real is allocated). Options are not validated here beyond what the policy checks."""
        from .compressor import Compressor as _Compressor

        offsets = _Compressor.token_centres(self.block_frames, *self.latent_hw)[0]
        options = {k: v for k, v in options.items() if k != "archive_device"}  # counted as device memory
        policy = make_policy(name, self.geometry(self.sampler.rows_per_prompt), compressed_t_offsets=offsets,
                             compressed_grid=self.compressed_grid, **options)
        return policy.allocate(num_blocks, device=torch.device("meta")).nbytes()

    def check_cache_memory(self, name: str, num_blocks: int, **options) -> int:
        """Raise ValueError if the cache would take more than `MEMORY_HEADROOM` of the free memory
        of the model's device (estimated with `cache_bytes`); returns the estimate in bytes."""
        need = self.cache_bytes(name, num_blocks, **options)
        free = available_memory(self.transformer.device)
        if free is not None and need > MEMORY_HEADROOM * free:
            raise ValueError(
                f"cache policy {name!r} with these settings needs {need / 2**30:.2f} GiB for its KV cache "
                f"({num_blocks} blocks) but only {free / 2**30:.2f} GiB of memory is free on "
                f"{self.transformer.device}; use fewer sink/recent/window frames, a smaller top_k or "
                "archive, or a shorter video")
        return need

    def build_policy(self, name: str, _recorder=None, compressor_mode: str | None = None, **options):
        """The pure policy ``name`` for this pipeline's geometry, and the compressor it uses.

        The second positional argument is ignored (policies no longer report to a recorder; the
        sampler does): it stays for existing callers."""
        options = self.check_policy_options(name, options)
        compressor = self.compressor_for(compressor_mode)
        offsets = compressor.centres(self.block_frames, *self.latent_hw)[0]
        policy = make_policy(name, self.geometry(self.sampler.rows_per_prompt), compressed_t_offsets=offsets,
                             compressed_grid=self.compressed_grid, **options)
        if policy.compresses and min(self.latent_hw) < MIN_COMPRESSED_LATENT:
            side = MIN_COMPRESSED_LATENT * self.vae.spatial_ratio
            raise ValueError(f"cache policy {name!r} compresses blocks, which needs frames of at least {side}x{side} "
                             f"pixels; this pipeline makes {self.width}x{self.height}: use another policy or a "
                             "larger size")
        return policy, compressor

    # -- generation ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt -> embeddings [1, L, text_dim] on the transformer's device. With ``text_offload`` the
        encoder visits that device for this call only and goes back to the CPU afterwards."""
        check_prompt(prompt)
        target = self.transformer.device
        with self._text_lock:
            visiting = self.text_offload and self.text_encoder.device != target
            if visiting:
                self.text_encoder.to(target)
            try:
                return self.text_encoder.encode([prompt]).to(target)
            finally:
                if visiting:
                    self.text_encoder.to("cpu")
                    if target.type == "cuda":
                        torch.cuda.empty_cache()

    def stream(
        self,
        prompt,
        seconds: float = 5.0,
        policy: str = "packforcing",
        seed: int = 0,
        recorder=None,
        compressor_mode: str | None = None,
        prompt_switch: str | None = None,
        **policy_options,
    ):
        """Yield one `BlockResult` (latents + decoded pixels) per block. Validates everything first.

        ``prompt``: text, or a `PromptSchedule` (the prompt changes at chosen seconds); ``prompt_switch``
        "keep" | "recache" (default: this pipeline's sampler setting) says what the cache does then."""
        num_blocks = self.num_blocks(seconds)
        seed = check_seed(seed)
        schedule = prompt if isinstance(prompt, PromptSchedule) else PromptSchedule.single(check_prompt(prompt))
        switch_blocks = schedule.switch_blocks(self.block_starts(num_blocks), seconds)
        sampler = self.sampler if prompt_switch is None else dataclasses.replace(self.sampler,
                                                                                 prompt_switch=prompt_switch)
        policy_options = self.check_policy_options(policy, policy_options)
        cache, compressor = self.build_policy(policy, compressor_mode=compressor_mode, **policy_options)
        self.check_cache_memory(policy, num_blocks, **policy_options)
        texts = [self.encode_prompt(p) for p in schedule.prompts]
        if recorder is not None and recorder.enabled:
            recorder.meta.update(
                policy=policy, options=policy_options, compressor=compressor.mode, seed=seed, seconds=seconds,
                fps=self.fps, block_frames=self.block_frames, model=self.name, prompt=schedule.first,
                temporal_ratio=self.vae.temporal_ratio, compressed_grid=list(self.compressed_grid),
                prompts=schedule.as_meta(switch_blocks), prompt_switch=sampler.prompt_switch,
            )
        return generate_blocks(
            self.transformer, texts[0], cache, num_blocks, self.latent_hw, sampler, seed=seed,
            decoder=self.vae.streaming_decoder(), compressor=compressor, vae=self.vae, recorder=recorder,
            fps=self.fps, temporal_ratio=self.vae.temporal_ratio,
            prompt_switches=dict(zip(switch_blocks[1:], texts[1:])),
        )

    def block_starts(self, num_blocks: int) -> list[float]:
        """Seconds of video before each block (block 0 starts at 0)."""
        return [start / self.fps for start, _ in block_frame_ranges(num_blocks, self.block_frames,
                                                                    self.vae.temporal_ratio)]

    def generate(self, prompt: str, seconds: float = 5.0, **kwargs) -> np.ndarray:
        """Whole video as uint8 [T, H, W, 3]."""
        return np.concatenate([to_uint8(block.pixels) for block in self.stream(prompt, seconds, **kwargs)])
