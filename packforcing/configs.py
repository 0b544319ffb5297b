"""Named model configurations (constructor arguments of `WanTransformer3DModel`)."""

from __future__ import annotations

# Wan2.1-T2V-1.3B (diffusers `transformer/config.json`).
WAN21_T2V_1P3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
    pos_embed_seq_len=None,
)

# A tiny transformer of the same architecture, for tests and the CPU default model.
TINY = dict(WAN21_T2V_1P3B, num_attention_heads=4, attention_head_dim=32, ffn_dim=512, num_layers=4, text_dim=64)

# Full-size geometry: 832x480 pixels -> 60x104 latent -> 30x52 = 1,560 tokens per latent frame.
WAN_LATENT_HW = (60, 104)

# ---- the real model: Self-Forcing DMD on Wan2.1-T2V-1.3B -----------------------------------------
# Text encoder (UMT5-XXL), tokenizer and VAE come from the diffusers repository; the causal
# transformer from Self-Forcing's checkpoint (original Wan key names with a `model.` prefix).
WAN21_DIFFUSERS_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
SELF_FORCING_REPO = "gdhe17/Self-Forcing"
SELF_FORCING_FILE = "checkpoints/self_forcing_dmd.pt"
SELF_FORCING_KEY = "generator_ema"
SELF_FORCING_BLOCK_FRAMES = 3  # latent frames per block of the public checkpoint
SELF_FORCING_STEPS = (1000, 750, 500, 250)  # denoising_step_list, warped with shift 5
SELF_FORCING_SHIFT = 5.0
