"""Training stages (a few steps at tiny sizes), resumable checkpoints, export/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file

from packforcing.compressor import Compressor
from packforcing.configs import TINY
from packforcing.model import CausalWanTransformer
from packforcing.training.data import HELDOUT_PROMPTS, build_text_encoder, training_seeds, word_tokenizer
from packforcing.training.loop import CHECKPOINT, LoopConfig, run_stage
from packforcing.training.stages import (
    CompressorStage, CompressorStageConfig, TransformerStage, TransformerStageConfig, VAEStage, VAEStageConfig,
    lr_tokens, object_weights, teacher_forcing_layout, three_partition_layout,
)
from packforcing.vae import WanVAE, tiny_vae_config

MINI = dict(TINY, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=1, text_dim=16)


def _model(seed=0, **over):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalWanTransformer(**dict(MINI, **over))


def _latents(n=2, hw=4, frames=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, 1, hw, hw, generator=g)  # a static "scene" plus slow drift: learnable
    drift = torch.linspace(0, 1, frames).view(1, 1, -1, 1, 1) * torch.randn(n, 16, 1, hw, hw, generator=g) * 0.3
    return base + drift


def _falls(losses, k=3):
    return np.mean(losses[-k:]) < np.mean(losses[:k])


def _loop(steps, lr, **kw):
    return LoopConfig(steps=steps, lr=lr, warmup=1, checkpoint_every=100, progress=False, **kw)


def test_vae_stage_loss_falls(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(**tiny_vae_config(4, 16))
    stage = VAEStage(vae, VAEStageConfig(batch=1, frames=5, crop=16, data_steps=1))
    losses = run_stage(stage, tmp_path, _loop(10, 3e-3))
    assert len(losses) == 10 and _falls(losses)
    assert (tmp_path / CHECKPOINT).exists() and (tmp_path / "log.csv").read_text().count("\n") == 11


@pytest.mark.parametrize("object_weight", [0.0, 8.0])
def test_vae_decoder_phase_keeps_the_encoder(tmp_path, object_weight):
    """The decoder-only phases must not move the encoder: the cached training latents stay valid."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(**tiny_vae_config(4, 16))
    encoder = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    stage = VAEStage(vae, VAEStageConfig(batch=1, frames=5, crop=16, data_steps=1, train_encoder=False,
                                         colour_from=0, anchor_weight=0.0, colour_anchor_weight=0.0,
                                         object_weight=object_weight))
    losses = run_stage(stage, tmp_path, _loop(6, 3e-3))
    assert _falls(losses, k=2)
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in encoder.items())


@pytest.mark.parametrize("object_weight", [0.0, 4.0])
def test_transformer_stage_loss_falls(tmp_path, object_weight):
    stage = TransformerStage(_model(), _latents(), torch.randn(2, 6, 16), torch.tensor([0, 1]),
                             TransformerStageConfig(data_steps=2, bf16=False, object_weight=object_weight))
    losses = run_stage(stage, tmp_path, _loop(12, 3e-3))
    assert _falls(losses)


def test_object_weights_single_out_cells_that_differ_from_the_background():
    x0 = torch.randn(1, 16, 1, 1, 1).expand(1, 16, 3, 6, 6).clone()  # a flat background, 3 frames
    x0[:, :, 1, 2, 3] += 2.0  # one "object" cell in frame 1
    x0[:, :, 2, 0, 0] += 1.0  # a fainter one in frame 2
    w = object_weights(x0, 4.0)
    assert w.shape == (1, 1, 3, 6, 6)
    assert torch.allclose(w[:, :, 0], torch.ones(1, 1, 6, 6))  # nothing but background: weight 1
    assert w[0, 0, 1, 2, 3] == pytest.approx(5.0) and w[0, 0, 2, 0, 0] == pytest.approx(5.0)
    others = torch.ones_like(w, dtype=torch.bool)
    others[0, 0, 1, 2, 3] = others[0, 0, 2, 0, 0] = False
    assert torch.allclose(w[others], torch.ones(()))


def test_compressor_stage_trains_only_hr_and_loss_falls(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    comp = Compressor(32, mode="both")
    stage = CompressorStage(model, comp, _latents(hw=8), torch.randn(2, 16, 2, 2, 2), torch.randn(2, 6, 16),
                            torch.tensor([0, 1]), CompressorStageConfig(data_steps=1, bf16=False))
    losses = run_stage(stage, tmp_path, _loop(10, 3e-3))
    assert _falls(losses)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # transformer frozen
    saved = load_file(str(tmp_path / CHECKPOINT))
    assert any(k.startswith("model.hr.") for k in saved) and not any(k.startswith("model.transformer") for k in saved)


def test_resume_continues_identically(tmp_path):
    text = torch.randn(2, 6, 16)

    def stage():
        return TransformerStage(_model(), _latents(), text, torch.tensor([0, 1]),
                                TransformerStageConfig(bf16=False))

    straight = stage()
    run_stage(straight, tmp_path / "a", _loop(4, 1e-3))
    interrupted = stage()
    first = run_stage(interrupted, tmp_path / "b", _loop(4, 1e-3, stop_at=2))
    assert len(first) == 2
    resumed = stage()  # fresh process: new model object, weights only from the checkpoint
    rest = run_stage(resumed, tmp_path / "b", _loop(4, 1e-3), resume=True)
    assert len(rest) == 2
    a, b = load_file(str(tmp_path / "a" / CHECKPOINT)), load_file(str(tmp_path / "b" / CHECKPOINT))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in log[1:]] == ["0", "1", "2", "3"]


def test_teacher_forcing_layout():
    mask, pos = teacher_forcing_layout(3, 2, gap=5, sink_blocks=1)
    fc = 4  # clean blocks 0,1 (2 frames each), then noisy blocks 0,1,2
    assert mask.shape == (10, 10)
    noisy2 = fc + 4  # first frame of noisy block 2
    assert mask[noisy2, :fc].all() and mask[noisy2, noisy2:].all() and not mask[noisy2, fc:noisy2].any()
    assert not mask[fc, :fc].any()  # noisy block 0 sees no context
    assert pos.tolist() == [0, 1, 7, 8, 0, 1, 7, 8, 9, 10]
    dropped, _ = teacher_forcing_layout(3, 2, drop_first=True)
    assert not dropped[noisy2, :2].any() and dropped[noisy2, 2:4].all()


def test_three_partition_layout():
    mask, s = three_partition_layout(4, 2)
    rows = lambda a, b: mask[s[a]][:, s[b]]  # noqa: E731
    assert rows("cur", "comp").all() and not rows("cur", "b2").any() and rows("cur", "b3").all()
    assert rows("comp", "b2").all() and rows("comp", "sink").all() and not rows("b2", "comp").any()
    assert rows("b3", "b2").all() and not rows("b3", "comp").any() and not rows("comp", "b3").any()


def test_precomputed_lr_tokens_equal_the_lr_branch():
    """Training uses LR latents encoded once; they must equal the LR branch the sampler runs."""
    from packforcing.compressor import LRBranch

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**tiny_vae_config(4, 16)).eval()
    vae.register_to_config(latents_mean=[0.1] * 16, latents_std=[2.0] * 16)
    wan = WanVAE(vae)
    model = _model()
    pixels = torch.rand(1, 3, 16, 64, 64) * 2 - 1  # a non-first block of 4 latent frames
    latents = torch.randn(1, 16, 4, 8, 8)
    ref = Compressor(32, mode="lr")(latents, pixels=pixels, vae=wan, patch_embedding=model.patch_embedding)
    with torch.no_grad():
        raw = vae.encode(LRBranch.pool_pixels(pixels, 4, 4)).latent_dist.mean[:, :, 1:]
        got = lr_tokens(model.patch_embedding, wan.normalize(raw), Compressor.output_grid(4, 8, 8))
    torch.testing.assert_close(got, ref)


def test_word_tokenizer_and_heldout_split():
    tok = word_tokenizer(24)
    ids = tok("A red circle, a blue square and a gray triangle bouncing over a dark grey background")["input_ids"]
    words = tok.convert_ids_to_tokens(ids)
    assert words[:4] == ["a", "red", "circle", ","] and words[-1] == "</s>" and "<unk>" not in words
    assert "grey" in words and len(ids) == 18
    from packforcing.world import Scene

    seeds = training_seeds(50)
    assert not {Scene.sample(s).caption() for s in seeds} & set(HELDOUT_PROMPTS)


def test_export_load_round_trip(tmp_path):
    from packforcing.pipeline import Pipeline
    from packforcing.tiny_world import load_tiny_world, save_tiny_world

    torch.manual_seed(0)
    transformer = CausalWanTransformer(**dict(MINI, text_dim=16)).eval()
    vae = AutoencoderKLWan(**tiny_vae_config(4, 16)).eval()
    vae.register_to_config(latents_mean=[0.05] * 16, latents_std=[1.5] * 16)
    text = build_text_encoder(text_dim=16, max_length=24)
    comp = Compressor(32, mode="both").eval()
    settings = dict(name="test world", height=64, width=64, fps=16, block_frames=4,
                    denoising_steps=[1000, 500], shift=3.0)
    save_tiny_world(tmp_path / "w", transformer, vae, text, comp, settings)
    loaded = load_tiny_world(tmp_path / "w")
    original = Pipeline(transformer, WanVAE(vae), text, comp, 64, 64, sampler=loaded.sampler, name="orig")
    assert loaded.name == "test world" and loaded.sampler.denoising_steps == (1000, 500)
    assert loaded.vae._std.flatten()[0] == pytest.approx(1.5)
    prompt = "a red circle bouncing over a navy background"
    kw = dict(seconds=3, policy="packforcing", seed=3, sink_frames=4, recent_frames=4, top_k=1)
    a, b = original.generate(prompt, **kw), loaded.generate(prompt, **kw)
    assert a.shape == (3 * 16 - 3, 64, 64, 3) and np.array_equal(a, b)


@pytest.mark.skipif(not __import__("packforcing.tiny_world").tiny_world.has_tiny_world(), reason="no assets")
def test_shipped_tiny_world_loads_and_is_small():
    import json

    from packforcing.tiny_world import MANIFEST, PIPELINE_NAME, TINY_WORLD_DIR, load_tiny_world
    from packforcing.world import world_spec

    total = sum(p.stat().st_size for p in TINY_WORLD_DIR.rglob("*") if p.is_file())
    assert total < 40 * 2**20
    settings = json.loads((TINY_WORLD_DIR / MANIFEST).read_text())
    world = world_spec(settings.get("world", "v1"))
    pipe = load_tiny_world()
    assert pipe.name.startswith(PIPELINE_NAME) and (pipe.height, pipe.width, pipe.fps) == (world.height, world.width, 16)
    assert pipe.sampler.guidance_scale == settings.get("guidance_scale", 1.0)
    assert pipe.transformer.config.num_layers == 4 and pipe.compressor.mode in ("lr", "both")
    prompt = "a red circle bouncing over a navy background"
    a = pipe.generate(prompt, seconds=1, policy="window", seed=1, window_frames=4)
    b = pipe.generate(prompt, seconds=1, policy="window", seed=1, window_frames=4)
    assert a.shape == (13, world.height, world.width, 3) and np.array_equal(a, b) and a.std() > 0


def test_average_interpolates_two_transformer_checkpoints(tmp_path):
    from packforcing.train import average_transformers, load_stage_module
    from packforcing.training.loop import save_checkpoint

    models = [_model(seed=1), _model(seed=2)]
    paths = []
    for i, model in enumerate(models):
        opt = torch.optim.AdamW(model.parameters())
        paths.append(tmp_path / f"m{i}.safetensors")
        save_checkpoint(paths[-1], 7, {"transformer": model}, opt)
    average_transformers(tmp_path / "out", [str(p) for p in paths], 0.25)
    mixed = load_stage_module(tmp_path / "out", "transformer", "transformer", _model(seed=3))
    a, b = models[0].state_dict(), models[1].state_dict()
    for k, v in mixed.state_dict().items():
        torch.testing.assert_close(v, 0.25 * a[k] + 0.75 * b[k])
    with pytest.raises(ValueError, match="different transformer weights"):
        comp = Compressor(32, mode="both")
        save_checkpoint(tmp_path / "c.safetensors", 1, {"hr": comp.hr}, torch.optim.AdamW(comp.hr.parameters()))
        average_transformers(tmp_path / "out", [str(paths[0]), str(tmp_path / "c.safetensors")], 0.5)
    with pytest.raises(ValueError, match="average-weight"):
        average_transformers(tmp_path / "out", [str(p) for p in paths], 1.5)


def test_cli_runs_a_stage_and_resume_skips_nothing_done(tmp_path):
    from packforcing.train import main

    args = ["vae", "--out", str(tmp_path), "--vae-steps", "2", "--vae-base-dim", "2", "--vae-crop", "16",
            "--vae-frames", "5", "--vae-batch", "1", "--no-progress"]
    assert main(args) == 0
    log = tmp_path / "vae" / "log.csv"
    assert log.read_text().count("\n") == 3  # header + 2 steps
    assert main(["vae", "--out", str(tmp_path), "--resume", "--no-progress"]) == 0  # finished: no new steps
    assert log.read_text().count("\n") == 3
