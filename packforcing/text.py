"""Text encoders: one interface, ``encode(prompts) -> [B, L, text_dim]`` float32.

`UMT5TextEncoder` wraps transformers' ``UMT5EncoderModel`` + tokenizer the way Wan does (and
diffusers' ``WanPipeline._get_t5_prompt_embeds``): prompts are cleaned, tokenized to exactly
``max_length`` tokens (padded, or truncated keeping the EOS token last), encoded with the
attention mask, and every position past a prompt's own tokens is set to exactly 0.

`TinyTextEncoder` is the same thing at toy size, built fully offline: a T5 tokenizer trained on a
list of captions and a randomly initialised 2-layer UMT5 encoder. Characters the tokenizer has
never seen map to ``<unk>``, so any prompt (non-Latin included) encodes.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, T5Tokenizer, UMT5Config, UMT5EncoderModel

WAN_TEXT_LENGTH = 512  # Wan2.1's T5 text length


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (diffusers ``prompt_clean`` without ftfy): unescape HTML, squash spaces."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5TextEncoder:
    """UMT5 encoder + tokenizer with Wan's zero padding.

    Args:
        tokenizer: a T5/UMT5 tokenizer (pads on the right, appends EOS).
        model: a ``UMT5EncoderModel``.
        max_length: tokens per prompt ``L`` (Wan: 512). Longer prompts are truncated.
    """

    def __init__(self, tokenizer, model: UMT5EncoderModel, max_length: int = WAN_TEXT_LENGTH):
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.max_length = int(max_length)

    @property
    def text_dim(self) -> int:
        """Width of the embeddings (the transformer's ``text_dim``; 4096 for UMT5-XXL)."""
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device=None, dtype=None) -> "UMT5TextEncoder":
        self.model.to(device=device, dtype=dtype)
        return self

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        subfolder: str = "text_encoder",
        tokenizer_subfolder: str = "tokenizer",
        max_length: int | None = None,
        dtype: torch.dtype = torch.float32,
        local_files_only: bool = True,
    ):
        """Load from a diffusers-layout directory (``text_encoder/`` + ``tokenizer/``).

        ``max_length`` defaults to the tokenizer's ``model_max_length`` capped at 512.
        """
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder=tokenizer_subfolder,
                                                  local_files_only=local_files_only)
        model = UMT5EncoderModel.from_pretrained(path, subfolder=subfolder, dtype=dtype,
                                                 local_files_only=local_files_only)
        if max_length is None:
            max_length = min(int(tokenizer.model_max_length), WAN_TEXT_LENGTH)
        return cls(tokenizer, model, max_length)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path/tokenizer`` and ``path/text_encoder`` (safetensors), diffusers layout."""
        path = Path(path)
        self.tokenizer.model_max_length = self.max_length
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.model.save_pretrained(path / "text_encoder")

    def tokenize(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both ``[B, L]`` int64. Raises ValueError for empty prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        cleaned = [clean_prompt(p) for p in prompts]
        for i, p in enumerate(cleaned):
            if not p:
                raise ValueError(f"prompt is empty (prompts[{i}] = {prompts[i]!r})")
        tokens = self.tokenizer(cleaned, padding="max_length", max_length=self.max_length,
                                truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompts -> embeddings ``[B, max_length, text_dim]`` float32 on the model's device.

        Positions after each prompt's tokens (its EOS included as a token) are exactly zero.
        """
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return emb.masked_fill(mask[..., None] == 0, 0.0)


class TinyTextEncoder(UMT5TextEncoder):
    """A toy UMT5 text encoder built offline (tests, CPU demo). ``text_dim`` = ``d_model``."""

    @classmethod
    def build(
        cls,
        captions: list[str],
        text_dim: int = 64,
        max_length: int = 32,
        seed: int = 0,
        num_layers: int = 2,
        num_heads: int = 4,
        vocab_size: int = 1000,
    ) -> "TinyTextEncoder":
        """Train a T5 (unigram) tokenizer on ``captions`` and init a tiny UMT5 encoder from ``seed``.

        The vocabulary holds at most ``vocab_size`` pieces (fewer if the captions are short).
        The global RNG is left untouched.
        """
        if not captions:
            raise ValueError("need at least one caption to train the tokenizer")
        tokenizer = T5Tokenizer().train_new_from_iterator(list(captions), vocab_size=vocab_size)
        tokenizer.model_max_length = max_length
        config = UMT5Config(
            vocab_size=len(tokenizer), d_model=text_dim, d_kv=text_dim // num_heads, d_ff=2 * text_dim,
            num_layers=num_layers, num_heads=num_heads, dropout_rate=0.0,
            relative_attention_num_buckets=32, relative_attention_max_distance=128,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UMT5EncoderModel(config)
        return cls(tokenizer, model, max_length)

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "TinyTextEncoder":
        """Inverse of `save` (``max_length`` is restored from the tokenizer config)."""
        tokenizer = AutoTokenizer.from_pretrained(Path(path) / "tokenizer", local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(Path(path) / "text_encoder", dtype=dtype,
                                                 local_files_only=True)
        return cls(tokenizer, model, int(tokenizer.model_max_length))
