"""Causal, block-wise Wan2.1 transformer on top of diffusers' `WanTransformer3DModel`.

Diffusers owns the weights and the pieces (patch embedding, condition embedder, blocks, output
head); we own the forward pass. Two forwards share one layer loop:

* `forward_block` denoises one block of latent frames against an external cache policy
  (Self-Forcing inference). The block may carry *compressed tokens* (PackForcing) that ride along
  the clean commit pass as a second stream: each layer runs the block's tokens first, then the
  compressed tokens, so the block's own K/V never see them (bit-identical with compression off).
* `forward_sequence` runs a whole sequence in one pass with an optional attention mask and
  per-frame timesteps and positions (teacher forcing, and the reference the cache is tested against).

The self-attention of every block (`attn1`) gets a `CacheAttnProcessor`; per-call state travels
in the ``rotary_emb`` argument (diffusers passes it through untouched) as an `AttentionCall`. The
cache is reached only through the call's `AttentionContext` (``update(layer, k, v)`` and, at step 0,
``score(layer, q)``); attention itself goes through diffusers' ``dispatch_attention_fn``, so any
backend diffusers offers (flash, sage, context parallel) applies. Called without an `AttentionCall`
(the inherited ``WanTransformer3DModel.forward``), the processor is diffusers' own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from .rope import Rope3D


@dataclass
class AttentionCall:
    """What one layer's self-attention needs besides its input. cos/sin: [N, head_dim/2] fp32."""

    cos: torch.Tensor
    sin: torch.Tensor
    layer: int = 0
    context: object | None = None  # an `AttentionContext`, or None for a plain (masked) forward
    stream: str = "block"  # "block" | "compressed"
    mask: torch.Tensor | None = None  # [N, N] bool (True = attend), plain forward only


class CacheAttnProcessor:
    """Self-attention that reads its keys/values from an attention context (or runs plain with a mask)."""

    _attention_backend = None  # set by diffusers' `set_attention_backend`, as on its own processors
    _parallel_config = None

    def __init__(self, rope: Rope3D):
        self.rope = rope
        self.stock = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if not isinstance(rotary_emb, AttentionCall):  # the inherited forward: diffusers' processor
            self.stock._attention_backend, self.stock._parallel_config = self._attention_backend, self._parallel_config
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        call = rotary_emb
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        # [B, N, heads, head_dim]
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
        q = self.rope.apply_tokens(q, call.cos, call.sin)
        k = self.rope.apply_tokens(k, call.cos, call.sin)

        context = call.context
        mask = call.mask[None, None] if call.mask is not None else None  # [1, 1, N, N]: never read as [B, T]
        if context is None:
            keys, values = k, v
        else:
            if call.stream == "block":
                if context.wants_queries:
                    context.score(call.layer, q)
                keys, values = context.update(call.layer, k, v)  # [B, heads, T, d] views
            else:
                keys, values = context.update_compressed(call.layer, k, v)
            keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, T, heads, d] views
        out = dispatch_attention_fn(q, keys, values, attn_mask=mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config if context is None else None)
        out = out.flatten(2, 3).type_as(hidden_states)  # [B, N, dim]
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class CrossKV:
    """One layer's cross-attention keys and values of the prompt, [B, L, heads, head_dim]."""

    key: torch.Tensor
    value: torch.Tensor


@dataclass
class PromptContext:
    """A prompt prepared once per generation: embedded text tokens [B, L, dim] and every layer's
    cross-attention K/V (as the reference implementation caches them), reused by every forward."""

    text_tokens: torch.Tensor
    cross: list[CrossKV]


class CrossAttnProcessor:
    """Cross-attention (``attn2``) that reads the prompt's precomputed K/V from a `CrossKV`; any other
    ``encoder_hidden_states`` (a tensor) goes to diffusers' own processor."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self):
        self.stock = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if not isinstance(encoder_hidden_states, CrossKV):
            self.stock._attention_backend = self._attention_backend
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(q, encoder_hidden_states.key, encoder_hidden_states.value,
                                    attn_mask=attention_mask, backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class CausalWanTransformer(WanTransformer3DModel):
    """`WanTransformer3DModel` with a block-causal, cache-aware forward. Same config and weights."""

    # No __init__ override: diffusers reads the constructor signature for from_config/from_pretrained.
    # The cache-aware processors are installed on first use instead.
    @property
    def rope3d(self) -> Rope3D:
        if getattr(self, "_rope3d", None) is None:
            self._rope3d = Rope3D(self.config.attention_head_dim)
        return self._rope3d

    def _install_processors(self) -> None:
        if not isinstance(self.blocks[0].attn1.processor, CacheAttnProcessor):
            for block in self.blocks:
                block.attn1.set_processor(CacheAttnProcessor(self.rope3d))
        if not isinstance(self.blocks[0].attn2.processor, CrossAttnProcessor):
            for block in self.blocks:
                block.attn2.set_processor(CrossAttnProcessor())

    def prompt_context(self, text: torch.Tensor) -> PromptContext:
        """text [B, L, text_dim] -> the embedded prompt and every layer's cross-attention K/V, computed
        once (text-to-video blocks; image-conditioned blocks keep recomputing through diffusers)."""
        self._install_processors()
        tokens = self.condition_embedder.text_embedder(text.to(self.dtype))
        cross = []
        for block in self.blocks:
            attn = block.attn2
            if attn.add_k_proj is not None:
                return PromptContext(tokens, [])  # I2V: the stock processor splits image and text context
            key = attn.norm_k(attn.to_k(tokens)).unflatten(2, (attn.heads, -1))
            cross.append(CrossKV(key, attn.to_v(tokens).unflatten(2, (attn.heads, -1))))
        return PromptContext(tokens, cross)

    # -- pieces ------------------------------------------------------------------------------
    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> tokens [B, F·(H/2)·(W/2), dim]."""
        return self.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()

    def unpatchify(self, tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """tokens [B, N, C·p_t·p_h·p_w] -> [B, C, F, H, W]."""
        p_t, p_h, p_w = self.config.patch_size
        b = tokens.shape[0]
        x = tokens.reshape(b, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def check_latents(self, latents: torch.Tensor, frames: int | None = None) -> None:
        """Clear errors for latents the model cannot take: [B, in_channels, F, H, W], H and W
        multiples of the patch size, F = the cache's block size when given."""
        c, (p_t, p_h, p_w) = self.config.in_channels, self.config.patch_size
        if latents.ndim != 5 or latents.shape[1] != c:
            raise ValueError(f"latents must be [B, {c}, F, H, W], got {tuple(latents.shape)}")
        if latents.shape[2] % p_t or latents.shape[3] % p_h or latents.shape[4] % p_w:
            raise ValueError(f"latent F/H/W {tuple(latents.shape[2:])} must be multiples of the patch {(p_t, p_h, p_w)}")
        if frames is not None and latents.shape[2] != frames:
            raise ValueError(f"block has {latents.shape[2]} latent frames but the cache expects {frames}")

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        p_t, p_h, p_w = self.config.patch_size
        return frames // p_t, height // p_h, width // p_w

    def conditions(self, timestep: torch.Tensor, text, tokens_per_step: int | None = None):
        """timestep [B] or [B, N] (per token) -> (temb, modulation [B,6,D] or [B,N,6,D], text tokens).
        ``text``: [B, L, text_dim], or a `PromptContext` (its tokens are reused, not re-embedded)."""
        prompt = text if isinstance(text, PromptContext) else None
        if prompt is not None:
            text = prompt.text_tokens.new_zeros(prompt.text_tokens.shape[0], 0, self.config.text_dim)  # time only
        seq = None
        if timestep.ndim == 2:
            seq = timestep.shape[1]
            timestep = timestep.flatten()
        temb, proj, text_tokens, _ = self.condition_embedder(timestep, text.to(self.dtype), None, timestep_seq_len=seq)
        proj = proj.unflatten(2, (6, -1)) if seq is not None else proj.unflatten(1, (6, -1))
        return temb, proj, (prompt.text_tokens if prompt is not None else text_tokens)

    def head(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if temb.ndim == 3:  # per token
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (self.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        return self.proj_out(hidden)

    def grid_cos_sin(self, frame_positions: torch.Tensor, height: int, width: int):
        """Per-frame temporal positions [F] (latent frames, may be fractional) -> cos, sin [F·h·w, d/2]."""
        _, gh, gw = self.token_grid(1, height, width)
        hh, ww = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        spatial = torch.stack([hh.flatten(), ww.flatten()], -1).double()  # [h·w, 2]
        tt = frame_positions.double().repeat_interleave(gh * gw)[:, None]
        pos = torch.cat([tt, spatial.repeat(len(frame_positions), 1)], dim=1)
        return self.rope3d.cos_sin(pos, device=self.device)

    # -- forwards ----------------------------------------------------------------------------
    def forward_block(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        context,
        step: int,
        t_start: float,
        commit: bool = False,
        compressed: torch.Tensor | None = None,
        compressed_positions: torch.Tensor | None = None,
        compressed_kv: str = "commit",
    ) -> torch.Tensor:
        """Denoise one block against the cache, through ``context`` (an `AttentionContext` made by
        the store for this block's plan, ``step`` and ``commit``).

        latents [B, C, F, H, W] (normalised latents of the current block); timestep [B] (0..1000);
        text [B, L, text_dim] or a `PromptContext` (cross-attention K/V computed once); step: denoising step (the commit pass is the last); t_start: temporal
        RoPE position of the block's first frame (latent frames, from the plan); commit: True for the
        clean pass at t = 0. compressed: optional tokens [B, N_c, dim] with positions [N_c, 3]
        (t, h, w) — only on the commit pass. Returns the flow prediction, same shape as ``latents``.
        """
        self._install_processors()
        self.check_latents(latents, frames=getattr(context, "block_frames", None))
        b, _, frames, height, width = latents.shape
        cos, sin = self.grid_cos_sin(t_start + torch.arange(frames, dtype=torch.float64), height, width)
        hidden = self.patchify(latents)
        temb, modulation, text_tokens = self.conditions(timestep, text)

        comp = None
        if compressed is not None:
            c_cos, c_sin = self.rope3d.cos_sin(compressed_positions, device=self.device)
            comp = compressed.to(self.dtype)
        cross = text.cross if isinstance(text, PromptContext) and text.cross else None
        for layer, block in enumerate(self.blocks):
            encoder = cross[layer] if cross is not None else text_tokens  # precomputed K/V, or the tokens
            call = AttentionCall(cos, sin, layer, context, "block")
            hidden = block(hidden, encoder, modulation, call)
            if comp is None:
                continue
            if compressed_kv == "commit":
                call = AttentionCall(c_cos, c_sin, layer, context, "compressed")
                comp = block(comp, encoder, modulation, call)
            elif compressed_kv == "projection":
                self._project_compressed(block, layer, comp, modulation, c_cos, c_sin, context)
            else:
                raise ValueError(f"compressed_kv must be 'commit' or 'projection', got {compressed_kv!r}")
        out = self.head(hidden, temb)
        return self.unpatchify(out, frames, height, width).float()

    def _project_compressed(self, block, layer, comp, modulation, cos, sin, context):
        """DESIGN §3.1 'projection': this layer's K/V of the compressed tokens straight from them."""
        attn = block.attn1
        shift, scale = (block.scale_shift_table + modulation.float()).chunk(6, dim=1)[:2]
        x = (block.norm1(comp.float()) * (1 + scale) + shift).type_as(comp)
        k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(x).unflatten(2, (attn.heads, -1))
        context.write_compressed(layer, self.rope3d.apply_tokens(k, cos, sin), v)

    def forward_sequence(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        frame_positions: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass over a whole sequence of latent frames.

        latents [B, C, F, H, W]; timestep [B] or per frame [B, F]; frame_positions [F] temporal
        RoPE positions (default 0..F-1); frame_mask [F, F] bool, True where frame i may attend
        frame j (expanded to tokens). Returns the flow prediction [B, C, F, H, W].
        """
        b, _, frames, height, width = latents.shape
        per_frame = self.token_grid(1, height, width)[1] * self.token_grid(1, height, width)[2]
        if frame_positions is None:
            frame_positions = torch.arange(frames, dtype=torch.float64)
        _, gh, gw = self.token_grid(1, height, width)
        positions = Rope3D.grid(1, gh, gw).repeat(frames, 1)
        positions[:, 0] = frame_positions.double().repeat_interleave(per_frame)
        if timestep.ndim == 2:
            timestep = timestep.repeat_interleave(per_frame, dim=1)  # [B, N]
        mask = None
        if frame_mask is not None:
            mask = frame_mask.repeat_interleave(per_frame, 0).repeat_interleave(per_frame, 1)
        out = self.forward_tokens(self.patchify(latents), positions, timestep, text, mask)
        return self.unpatchify(out, frames, height, width).float()

    def forward_tokens(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer loop over arbitrary tokens (e.g. patch tokens plus compressed tokens).

        hidden [B, N, dim]; positions [N, 3] (t, h, w; fractional allowed); timestep [B] or
        [B, N]; mask [N, N] bool (True = attend). Returns head outputs [B, N, C·p_t·p_h·p_w]
        (`unpatchify` the patch-token part). Differentiable: used for training.
        """
        self._install_processors()
        cos, sin = self.rope3d.cos_sin(positions, device=self.device)
        temb, modulation, text_tokens = self.conditions(timestep, text)
        mask = mask.to(self.device) if mask is not None else None
        for layer, block in enumerate(self.blocks):
            hidden = block(hidden, text_tokens, modulation, AttentionCall(cos, sin, layer, None, mask=mask))
        return self.head(hidden, temb)


def block_causal_mask(frames: int, block_frames: int) -> torch.Tensor:
    """[F, F] bool: frame i attends frame j iff block(j) <= block(i)."""
    blocks = torch.arange(frames) // block_frames
    return blocks[None, :] <= blocks[:, None]
