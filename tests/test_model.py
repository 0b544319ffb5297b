"""The causal transformer and chunked sampler against one-shot references."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from packforcing.cache import make_policy
from packforcing.configs import TINY
from packforcing.model import CausalWanTransformer
from packforcing.sampler import SamplerConfig, generate_blocks, warp_timesteps
from tests.conftest import record_forward_calls, teacher_forcing_layout, tiny_geometry


def test_schedule_is_self_forcing_warped():
    assert warp_timesteps([1000, 750, 500, 250], shift=5.0) == pytest.approx([1000, 937.5, 833.333333, 625])


def test_from_config_builds_the_configured_size():
    model = CausalWanTransformer.from_config(TINY)
    assert model.config.num_layers == TINY["num_layers"] and len(model.blocks) == TINY["num_layers"]


def test_sequence_forward_equals_diffusers(tiny_model):
    ref = WanTransformer3DModel(**TINY).eval()
    ref.load_state_dict(tiny_model.state_dict())
    x, t, text = torch.randn(1, 16, 3, 8, 12), torch.tensor([500.0]), torch.randn(1, 7, 64)
    with torch.no_grad():
        assert torch.equal(ref(x, t, text).sample, tiny_model.forward_sequence(x, t, text))


@pytest.mark.parametrize("block_frames", [3, 4])
def test_chunked_full_cache_equals_one_masked_forward(tiny_model, block_frames):
    """Cached chunked generation == one forward over [clean blocks | noisy blocks] with a
    block-causal mask: noisy block i sees clean blocks < i and itself (teacher forcing layout)."""
    num_blocks, hw = 3, (8, 8)
    geometry = tiny_geometry(block_frames, (4, 4), TINY["num_layers"], TINY["num_attention_heads"], 32)
    calls = record_forward_calls(tiny_model)
    try:
        text = torch.randn(1, 5, 64)
        config = SamplerConfig(block_frames=block_frames)
        blocks = list(generate_blocks(tiny_model, text, make_policy("full", geometry), num_blocks, hw, config, seed=3))
    finally:
        del tiny_model.forward_block
    clean = torch.cat([b.latents for b in blocks], dim=2)
    frames = num_blocks * block_frames
    mask, positions = teacher_forcing_layout(num_blocks, block_frames)
    for step in range(len(config.timesteps)):
        noisy = [c for c in calls if c["step"] == step and not c["commit"]]
        assert [c["t_start"] for c in noisy] == [b * block_frames for b in range(num_blocks)]
        latents = torch.cat([clean] + [c["x"] for c in noisy], dim=2)
        timesteps = torch.cat([torch.zeros(frames)] + [c["t"].expand(block_frames) for c in noisy])[None]
        with torch.no_grad():
            out = tiny_model.forward_sequence(latents, timesteps, text, positions, mask)
        reference = torch.cat([c["out"] for c in noisy], dim=2)
        torch.testing.assert_close(out[:, :, frames:], reference, rtol=1e-5, atol=1e-5)


def test_same_seed_same_video(tiny_model):
    geometry = tiny_geometry(4, (4, 4), TINY["num_layers"], TINY["num_attention_heads"], 32)
    text = torch.randn(1, 5, 64)

    def run(seed):
        policy = make_policy("window", geometry, window_frames=4)
        return torch.cat([b.latents for b in generate_blocks(tiny_model, text, policy, 3, (8, 8), seed=seed)], 2)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


@pytest.mark.parametrize("solver", ["renoise", "euler"])
def test_solver_steps_between_timesteps(tiny_model, solver):
    """Each step's input follows from the previous step's model output: Euler moves along the flow
    (x' = x + (σ' − σ)·v), renoise draws fresh noise around x0 = x − σ·v; the block's latents are
    the last x0 either way."""
    geometry = tiny_geometry(4, (4, 4), TINY["num_layers"], TINY["num_attention_heads"], 32)
    calls = record_forward_calls(tiny_model)
    try:
        config = SamplerConfig(solver=solver)
        blocks = list(generate_blocks(tiny_model, torch.randn(1, 5, 64), make_policy("full", geometry), 2,
                                      (8, 8), config, seed=1))
    finally:
        del tiny_model.forward_block
    sigmas = [t / 1000 for t in config.timesteps]
    for b, block in enumerate(blocks):
        noisy = [c for c in calls if c["t_start"] == 4 * b and c["step"] < len(sigmas)]
        for k in range(len(sigmas) - 1):
            euler = noisy[k]["x"] + (sigmas[k + 1] - sigmas[k]) * noisy[k]["out"]
            assert torch.allclose(noisy[k + 1]["x"], euler, atol=1e-5) == (solver == "euler")
        torch.testing.assert_close(block.latents, noisy[-1]["x"] - sigmas[-1] * noisy[-1]["out"])


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="solver"):
        SamplerConfig(solver="ddpm")


@pytest.mark.parametrize("policy_name", ["full", "window"])
def test_guided_cached_generation_equals_the_guided_masked_forward(tiny_model, policy_name):
    """Classifier-free guidance with a cache (conditional and unconditional rows batched, each with
    its own cache rows) equals the cache-free block-by-block reference (`training.probe`)."""
    import dataclasses

    from packforcing.training.probe import sample_blocks

    config = SamplerConfig(denoising_steps=(1000, 600, 300), shift=3.0, solver="euler", guidance_scale=3.0)
    geometry = dataclasses.replace(tiny_geometry(4, (4, 4), TINY["num_layers"], TINY["num_attention_heads"], 32),
                                   batch_size=2)
    text = torch.randn(1, 5, 64)
    options = {"window_frames": 16} if policy_name == "window" else {}  # the window holds all 3 blocks
    blocks = list(generate_blocks(tiny_model, text, make_policy(policy_name, geometry, **options), 3, (8, 8),
                                  config, seed=4))
    cached = torch.cat([b.latents for b in blocks], dim=2)
    gen = torch.Generator().manual_seed(4)
    reference = sample_blocks(tiny_model, text, 3, (8, 8), config.timesteps, guidance=3.0, generator=gen)
    assert cached.shape == (1, 16, 12, 8, 8)
    assert torch.allclose(cached, reference, atol=2e-4, rtol=1e-4)
    unguided = torch.cat([b.latents for b in generate_blocks(
        tiny_model, text, make_policy(policy_name, dataclasses.replace(geometry, batch_size=1), **options), 3, (8, 8),
        dataclasses.replace(config, guidance_scale=1.0), seed=4)], dim=2)
    assert not torch.allclose(cached, unguided, atol=1e-3)  # guidance changes the video


def test_guidance_needs_a_cache_for_both_rows(tiny_model):
    config = SamplerConfig(guidance_scale=2.0)
    policy = make_policy("full", tiny_geometry(4, (4, 4), TINY["num_layers"], TINY["num_attention_heads"], 32))
    with pytest.raises(ValueError, match="allocated for batch 1, the sampler needs 2"):
        next(generate_blocks(tiny_model, torch.randn(1, 5, 64), policy, 1, (8, 8), config))
    with pytest.raises(ValueError, match="guidance_scale"):
        SamplerConfig(guidance_scale=-1)
