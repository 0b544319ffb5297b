"""Training data of the tiny world: held-out prompts, clips, the word-level text encoder, latents.

Training clips are ``make_clip(seed)`` for seeds ``0, 1, 2, …`` (5-second clips, 77 pixel frames,
128×128, 16 fps), skipping any clip whose caption is one of the held-out evaluation prompts
(`HELDOUT_PROMPTS`). Evaluation uses those prompts with seeds >= `EVAL_SEED_BASE`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..world import Scene, format_caption, make_clip, vocabulary, world_spec

# Held-out evaluation prompts: never used as a training caption (every word is in the vocabulary).
HELDOUT_PROMPTS = (
    "a red circle bouncing over a navy background",
    "a yellow square and a blue circle bouncing over a black background",
    "a green triangle and a magenta circle bouncing over a dark grey background",
    "a white square bouncing over a maroon background",
    "an orange circle and a cyan square bouncing over a dark green background",
    "a blue triangle, a yellow circle and a red square bouncing over a white background",
)
EVAL_SEED_BASE = 1_000_000


def training_seeds(count: int, start: int = 0) -> list[int]:
    """The first ``count`` seeds >= start whose caption is not held out."""
    held = set(HELDOUT_PROMPTS)
    seeds, seed = [], start
    while len(seeds) < count:
        if Scene.sample(seed).caption() not in held:
            seeds.append(seed)
        seed += 1
    return seeds


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


# -- text -------------------------------------------------------------------------------------------
def word_tokenizer(max_length: int = 24):
    """A word-level tokenizer over the caption vocabulary (+ ``,``), lower-cased, "gray" -> "grey",
    appending ``</s>``; unknown words map to ``<unk>``. A `PreTrainedTokenizerFast`, so it saves
    and reloads with ``AutoTokenizer`` (what `TinyTextEncoder.load` uses)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary(include_punctuation=True))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"\bgray\b"), "grey")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length, padding_side="right")


def build_text_encoder(text_dim: int = 64, max_length: int = 24, seed: int = 0, num_layers: int = 2,
                       num_heads: int = 4):
    """`TinyTextEncoder` with the word-level tokenizer and a frozen, randomly initialised 2-layer
    UMT5 encoder (seeded). The transformer learns to read its outputs; the encoder is not trained."""
    from transformers import UMT5Config, UMT5EncoderModel

    from ..text import TinyTextEncoder

    tokenizer = word_tokenizer(max_length)
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=text_dim, d_kv=text_dim // num_heads, d_ff=2 * text_dim,
        num_layers=num_layers, num_heads=num_heads, dropout_rate=0.0, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    return TinyTextEncoder(tokenizer, model, max_length)


# -- VAE batches ------------------------------------------------------------------------------------
def vae_batch(rng: np.random.Generator, batch: int, frames: int, crop: int, size: int | None = None,
              fps: float = 16, world="v1") -> torch.Tensor:
    """Random short clips for VAE training: [B, 3, frames, crop, crop] in [-1, 1].

    Each item: a random scene of `world` (`Scene.sample`), rendered at `size` (default: the world's)
    from a random start time, randomly cropped.
    """
    world = world_spec(world)
    size = size or world.height
    out = []
    for _ in range(batch):
        scene = Scene.sample(rng, world=world)
        start = int(rng.integers(0, 2000))
        clip = scene.render(frames, size, size, fps, start=start)
        y, x = (int(v) for v in rng.integers(0, size - crop + 1, size=2))
        out.append(to_pixels(np.ascontiguousarray(clip[:, y : y + crop, x : x + crop])))
    return torch.stack(out)


# -- latent dataset ----------------------------------------------------------------------------------
LATENTS = "latents.safetensors"


@torch.no_grad()
def encode_dataset(vae, seeds: list[int], num_frames: int = 77, size: int = 128, batch: int = 4,
                   lr_block: int = 2, block_frames: int = 4, progress: bool = True):
    """Encode training clips with the (unnormalised) VAE.

    Returns dict: ``raw`` [N,16,F,h,w] posterior means, ``lr_raw`` [N,16,ceil(B/2),h/4,w/4] the
    LR-branch latents of block ``lr_block`` (pooled ground-truth pixels re-encoded exactly as
    `LRBranch` does, warm-up latent dropped), ``captions`` list[str], ``seeds``.
    """
    from tqdm import tqdm

    from ..compressor import LRBranch

    raws, lrs, captions = [], [], []
    temporal = 2 ** sum(vae.config.temperal_downsample)
    for i in tqdm(range(0, len(seeds), batch), desc="encode clips", disable=not progress):
        clips, pooled = [], []
        for seed in seeds[i : i + batch]:
            frames, caption, _ = make_clip(seed, num_frames, size, size)
            px = to_pixels(frames)
            clips.append(px)
            captions.append(caption)
            # pixel frames of latent block `lr_block` (not the first block): 4·B frames
            f0 = temporal * block_frames * lr_block - (temporal - 1)
            block_px = px[:, f0 : f0 + temporal * block_frames][None]
            pooled.append(LRBranch.pool_pixels(block_px, block_frames, temporal)[0])
        raws.append(vae.encode(torch.stack(clips)).latent_dist.mean)
        lrs.append(vae.encode(torch.stack(pooled)).latent_dist.mean[:, :, 1:])
    return {"raw": torch.cat(raws), "lr_raw": torch.cat(lrs), "captions": captions, "seeds": list(seeds)}


def save_latents(path: Path, data: dict, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    meta = {"captions": json.dumps(data["captions"]), "seeds": json.dumps(data["seeds"]),
            "extra": json.dumps(extra or {})}
    tensors = {k: v.contiguous() for k, v in data.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(path), metadata=meta)


def load_latents(path: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    data = dict(load_file(str(path)))
    data["captions"] = json.loads(meta["captions"])
    data["seeds"] = json.loads(meta["seeds"])
    data["extra"] = json.loads(meta.get("extra", "{}"))
    return data


__all__ = [
    "EVAL_SEED_BASE", "HELDOUT_PROMPTS", "build_text_encoder", "encode_dataset", "format_caption",
    "load_latents", "save_latents", "training_seeds", "vae_batch", "word_tokenizer",
]
