"""The v2 tiny-world recipe: held-out captions, the on-the-fly clip pool, the transformer stage
(resumable bit for bit, EMA, caption dropout) at toy size."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from packforcing import train_v2
from packforcing.training.v2 import HELDOUT_V2, ClipPool, caption_key, is_heldout, training_scene
from packforcing.world import parse_caption, world_spec

TOY = train_v2.V2Config(vae_base_dim=4, vae_steps=2, vae_stat_clips=2, dim=32, heads=2, layers=1, ffn=64,
                        text_dim=16, transformer_steps=6, pool_slots=3, first_batch=2, checkpoint_every=3,
                        bf16=False)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("v2")
    train_v2.train_vae(TOY, out, resume=False, progress=False)
    return out


def test_heldout_captions_are_valid_v2_captions_and_never_drawn_for_training():
    spec = world_spec("v2")
    for caption in HELDOUT_V2:
        objects, background = parse_caption(caption)
        assert background in spec.backgrounds and 1 <= len(objects) <= spec.max_objects
        assert all(c in spec.colours and s in spec.shapes for c, s in objects)
    swapped = "a blue circle and a yellow square bouncing over a black background"
    assert is_heldout(swapped) and caption_key(swapped) == caption_key(HELDOUT_V2[1])
    rng = np.random.default_rng(0)
    drawn = {training_scene(rng).caption() for _ in range(3000)}
    assert not any(is_heldout(c) for c in drawn) and len(drawn) > 200


def test_clip_pool_state_is_a_function_of_the_step(toy_run):
    vae = train_v2.final_vae(TOY, toy_run)
    walked = ClipPool(vae, slots=3, seed=5, refresh_every=2)
    for step in range(10):
        walked.at(step)
    fresh = ClipPool(vae, slots=3, seed=5, refresh_every=2).at(9)
    assert walked.captions == fresh.captions
    assert torch.equal(walked.latents, fresh.latents)
    assert walked.latents.shape == (3, 16, 20, 8, 8)
    before = list(walked.captions), walked.latents.clone()
    walked.at(10)  # refresh 5 fills slot 5 % 3 = 2 only
    assert walked.captions[:2] == before[0][:2] and torch.equal(walked.latents[:2], before[1][:2])
    assert not torch.equal(walked.latents[2], before[1][2])


def test_transformer_phase_resumes_bit_for_bit_and_keeps_an_ema(toy_run, tmp_path):
    import shutil

    for name in ("a", "b"):
        shutil.copytree(toy_run, tmp_path / name)
    straight = train_v2.train_transformer(TOY, tmp_path / "a", resume=False, progress=False)
    # run b stops after 3 steps (as an interrupted run would) and is resumed to 6
    train_v2.train_transformer(TOY, tmp_path / "b", resume=False, progress=False, stop_at=3)
    rest = train_v2.train_transformer(TOY, tmp_path / "b", resume=True, progress=False)
    assert len(straight) == 6 and len(rest) == 3 and straight[3:] == rest
    a = load_file(str(tmp_path / "a" / "transformer" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "b" / "transformer" / "checkpoint.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    live = {k[len("model.transformer."):]: v for k, v in a.items() if k.startswith("model.transformer.")}
    ema = {k[len("model.ema_transformer."):]: v for k, v in a.items() if k.startswith("model.ema_transformer.")}
    assert live.keys() == ema.keys()
    assert any(not torch.equal(live[k], ema[k]) for k in live)  # EMA lags the live weights
    assert any(k.startswith("model.text.") for k in a)  # the text encoder is trained too


def test_caption_dropout_gives_the_all_zero_embedding(toy_run):
    from packforcing.training.v2 import TransformerV2Config, TransformerV2Stage

    vae = train_v2.final_vae(TOY, toy_run)
    stage = TransformerV2Stage(train_v2.build_transformer(TOY), train_v2.build_text(TOY), ClipPool(vae, 3),
                               TransformerV2Config())
    captions = [HELDOUT_V2[0], HELDOUT_V2[1]]
    emb = stage.embed(captions, torch.tensor([False, True]))
    assert emb[0].abs().sum() > 0 and torch.count_nonzero(emb[1]) == 0
    ids, mask = stage.text.tokenize(captions[0])
    assert torch.count_nonzero(emb[0][mask[0] == 0]) == 0  # padding is exactly zero


def test_transformer_loss_falls_on_toy_data(toy_run, tmp_path):
    import shutil

    shutil.copytree(toy_run, tmp_path / "run")
    cfg = dataclasses.replace(TOY, transformer_steps=40, transformer_lr=2e-3, pool_slots=2)
    losses = train_v2.train_transformer(cfg, tmp_path / "run", resume=False, progress=False)
    assert np.mean(losses[-8:]) < 0.9 * np.mean(losses[:8])  # from ~2.5 towards the flow-matching floor


def test_probe_sampler_is_causal_and_guidance_is_exact_on_equal_inputs():
    from packforcing.training.probe import sample_blocks

    model = train_v2.build_transformer(TOY).eval()
    text = torch.randn(1, 16, TOY.text_dim)
    steps = [1000.0, 500.0]
    two = sample_blocks(model, text, 2, (8, 8), steps, generator=torch.Generator().manual_seed(0))
    one = sample_blocks(model, text, 1, (8, 8), steps, generator=torch.Generator().manual_seed(0))
    assert two.shape == (1, 16, 8, 8, 8)
    assert torch.allclose(two[:, :, :4], one, atol=1e-6)  # later blocks never change earlier ones
    zeros = torch.zeros_like(text)  # cond == uncond: guidance must be a no-op
    g1 = sample_blocks(model, zeros, 1, (8, 8), steps, 1.0, generator=torch.Generator().manual_seed(1))
    g3 = sample_blocks(model, zeros, 1, (8, 8), steps, 3.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(g1, g3, atol=1e-5)


def test_probe_sampler_continues_a_given_context_as_its_own_rollout():
    """A rollout continued from its own first block (the generator advanced by that block's noise)
    is the uninterrupted rollout; a context that is not whole blocks is refused."""
    from packforcing.training.probe import sample_blocks

    model = train_v2.build_transformer(TOY).eval()
    text = torch.randn(1, 16, TOY.text_dim)
    steps = [1000.0, 500.0]
    full = sample_blocks(model, text, 3, (8, 8), steps, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    torch.randn(1, 16, 4, 8, 8, generator=gen)  # the first block's noise
    continued = sample_blocks(model, text, 2, (8, 8), steps, generator=gen, context=full[:, :, :4])
    assert continued.shape == full.shape
    assert torch.allclose(continued, full, atol=1e-5)
    gen = torch.Generator().manual_seed(0)
    torch.randn(1, 16, 4, 8, 8, generator=gen)
    other = sample_blocks(model, text, 1, (8, 8), steps, generator=gen, context=torch.zeros_like(full[:, :, :4]))
    assert not torch.allclose(other[:, :, 4:], full[:, :, 4:8], atol=1e-3)  # same noise, other context
    with pytest.raises(ValueError, match="multiple of 4"):
        sample_blocks(model, text, 1, (8, 8), steps, context=full[:, :, :3])


def test_self_generated_context_changes_the_training_context(toy_run):
    from packforcing.training.v2 import TransformerV2Config, TransformerV2Stage

    vae = train_v2.final_vae(TOY, toy_run)
    losses = []
    for p in (0.0, 1.0):
        torch.manual_seed(0)
        model, text = train_v2.build_transformer(TOY), train_v2.build_text(TOY)
        stage = TransformerV2Stage(model, text, ClipPool(vae, 3), TransformerV2Config(
            first_batch=0, p_self_context=p, bf16=False))
        losses.append(float(stage.loss(0).detach()))
    assert np.isfinite(losses).all() and losses[0] != losses[1]


def test_shape_variants_change_only_the_first_objects_shape_and_keep_its_area():
    from packforcing.training.v2 import shape_variants

    shapes = world_spec("v2").shapes
    rng, short = np.random.default_rng(3), 0
    for _ in range(300):
        scene = training_scene(rng)
        variants = shape_variants(scene, shapes)
        short += len(variants) < len(shapes)
        assert not any(is_heldout(v.caption()) for v in variants)
        assert len({v.objects[0].shape for v in variants}) == len(variants)
        for v in variants:
            assert v.background == scene.background and v.objects[1:] == scene.objects[1:]
            a, b = v.objects[0], scene.objects[0]
            assert (a.colour, a.x, a.y, a.vx, a.vy) == (b.colour, b.x, b.y, b.vx, b.vy)
            assert a.area == pytest.approx(b.area)
            if a.shape != b.shape:
                assert not np.array_equal(v.render(1, 64, 64), scene.render(1, 64, 64))
    assert short > 0  # some scenes are one shape away from a held-out caption: that shape is left out


def test_shape_groups_add_first_blocks_without_changing_the_rest_of_a_step(toy_run):
    from packforcing.training.v2 import TransformerV2Config, TransformerV2Stage

    vae = train_v2.final_vae(TOY, toy_run)
    totals, stage = [], None
    for groups in (0, 1):
        torch.manual_seed(0)
        model, text = train_v2.build_transformer(TOY), train_v2.build_text(TOY)
        stage = TransformerV2Stage(model, text, ClipPool(vae, 3), TransformerV2Config(
            clip_batch=0, first_batch=2, bf16=False, shape_groups=groups))
        totals.append(float(stage.loss(4).detach()))
    group_loss, count = stage.shape_group_loss(4)
    assert count >= 2 and np.isfinite(totals).all()
    # the ordinary first blocks draw what they drew without groups; the groups share their half by count
    assert totals[1] == pytest.approx((2 * totals[0] + count * float(group_loss.detach())) / (2 + count), rel=1e-5)


def test_input_weights_depend_on_the_noisy_input_only_and_favour_what_is_not_background():
    from packforcing.training.v2 import input_weights

    gen = torch.Generator().manual_seed(0)
    x_t = 0.1 * torch.randn(3, 16, 4, 8, 8, generator=gen)
    x_t[:, :, :, 2:4, 3:5] += 2.0  # an "object" in every frame
    w = input_weights(x_t, 4.0)
    assert w.shape == (3, 1, 4, 8, 8) and torch.allclose(w.mean(dim=(3, 4)), torch.ones(3, 1, 4))
    assert (w[..., 2:4, 3:5].amin() > 2 * w[..., 6:, :2].amax())  # object cells outweigh far background
    assert torch.equal(input_weights(x_t, 0.0), torch.ones(3, 1, 4, 8, 8))
    # a function of x_t alone: the same input gives the same weights, whatever the target would be
    assert torch.equal(input_weights(x_t.clone(), 4.0), w)


def test_the_input_weighted_loss_is_the_plain_loss_at_strength_zero(toy_run):
    from packforcing.training.v2 import TransformerV2Config, TransformerV2Stage

    vae = train_v2.final_vae(TOY, toy_run)
    losses = []
    for strength in (None, 0.0, 4.0):
        torch.manual_seed(0)
        model, text = train_v2.build_transformer(TOY), train_v2.build_text(TOY)
        extra = {} if strength is None else {"input_weight": strength}
        stage = TransformerV2Stage(model, text, ClipPool(vae, 3), TransformerV2Config(first_batch=2, bf16=False, **extra))
        losses.append(float(stage.loss(2).detach()))
    assert losses[0] == losses[1] and losses[2] != losses[0] and np.isfinite(losses).all()


def test_export_writes_a_loadable_tiny_world_from_the_ema_weights(toy_run, tmp_path):
    import json
    import shutil

    from packforcing.tiny_world import load_tiny_world

    shutil.copytree(toy_run, tmp_path / "run")
    train_v2.train_transformer(dataclasses.replace(TOY, transformer_steps=2), tmp_path / "run", resume=False,
                               progress=False)
    dest = train_v2.export(TOY, tmp_path / "run", tmp_path / "tw", guidance_scale=2.0)
    settings = json.loads((dest / "tiny_world.json").read_text())
    assert settings["world"] == "v2" and (settings["height"], settings["width"]) == (64, 64)
    assert settings["guidance_scale"] == 2.0
    pipe = load_tiny_world(dest)
    ckpt = load_file(str(tmp_path / "run" / "transformer" / "checkpoint.safetensors"))
    theta0 = train_v2.build_transformer(TOY).state_dict()
    keep = TOY.ema ** 2
    for key, value in pipe.transformer.state_dict().items():  # the bias-corrected EMA
        expected = (ckpt["model.ema_transformer." + key] - keep * theta0[key]) / (1 - keep)
        assert torch.allclose(value, expected, atol=1e-5), key
    video = pipe.generate(HELDOUT_V2[0], seconds=1, policy="window", seed=0)
    assert video.shape[1:] == (64, 64, 3)


def test_bias_corrected_ema_of_one_step_is_the_live_weights(toy_run, tmp_path):
    import shutil

    shutil.copytree(toy_run, tmp_path / "run")
    train_v2.train_transformer(dataclasses.replace(TOY, transformer_steps=1), tmp_path / "run", resume=False,
                               progress=False)
    ema, _, step = train_v2.load_weights(TOY, tmp_path / "run", "ema")
    live, _, _ = train_v2.load_weights(TOY, tmp_path / "run", "live")
    assert step == 1
    for (k, a), b in zip(ema.state_dict().items(), live.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), k  # after one update EMA = d·θ0 + (1 − d)·θ1


def test_probe_command_scores_a_run_on_the_heldout_prompts(toy_run, tmp_path):
    import shutil

    from analysis.probe import probe, run_sampler, save_strips

    shutil.copytree(toy_run, tmp_path / "run")
    train_v2.train_transformer(dataclasses.replace(TOY, transformer_steps=1), tmp_path / "run", resume=False,
                               progress=False)
    (tmp_path / "run" / "config.json").write_text(json.dumps(dataclasses.asdict(TOY)))  # as the CLI writes it
    sample = run_sampler(tmp_path / "run", guidance=2.0, steps=[1000.0, 500.0])
    a, b = sample(HELDOUT_V2[0], 7, 1), sample(HELDOUT_V2[0], 7, 1)
    assert a.shape == (13, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    table, videos = probe(sample, seconds=1, every=6)
    assert list(table["prompt"]) == list(HELDOUT_V2) and table["strict_fidelity"].between(0, 1).all()
    assert save_strips(videos, tmp_path / "strip.png", count=3).exists()


def test_decoder_phase_keeps_the_encoder_and_export_uses_its_decoder(toy_run, tmp_path):
    import shutil

    shutil.copytree(toy_run, tmp_path / "run")
    cfg = dataclasses.replace(TOY, vae_decoder_steps=2)
    before = train_v2.final_vae(cfg, tmp_path / "run")
    train_v2.train_vae_decoder(cfg, tmp_path / "run", resume=False, progress=False)
    after = train_v2.final_vae(cfg, tmp_path / "run", decoder=True)
    enc_b, enc_a = before.encoder.state_dict(), after.encoder.state_dict()
    assert all(torch.equal(enc_b[k], enc_a[k]) for k in enc_b)
    dec_b, dec_a = before.decoder.state_dict(), after.decoder.state_dict()
    assert any(not torch.equal(dec_b[k], dec_a[k]) for k in dec_b)
    assert before.config.latents_mean == after.config.latents_mean


def test_recipe_config_round_trips_through_its_json_and_reads_older_runs():
    import dataclasses
    import json

    cfg = dataclasses.replace(TOY, sample_steps=(1000, 500), transformer_steps=7)
    assert train_v2.V2Config.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    older = dict(json.loads(json.dumps(dataclasses.asdict(cfg))), sample_steps="1000,500", unknown_key=1)
    assert train_v2.V2Config.from_dict(older) == cfg


def test_memory_pool_clips_show_a_return_under_a_colour_free_caption(toy_run):
    from packforcing.world import COLOURS
    from packforcing.world.memory import training_clip, visible

    for k in range(6):
        scene, start = training_clip(np.random.default_rng(k))
        shown = visible(scene, 77, 64, 64, start=start)[:, 0]
        changes = np.flatnonzero(np.diff(shown.astype(int)))
        assert shown[0] and len(changes) >= 2  # in view, out of view, back in view within the clip
    vae = train_v2.final_vae(TOY, toy_run)
    mixed = ClipPool(vae, slots=6, seed=1, memory_fraction=1.0).at(0)
    assert all(not set(c.split(" bouncing")[0].split()) & set(COLOURS) for c in mixed.captions)
    entering = ClipPool(vae, slots=6, seed=1, memory_fraction=1.0, entrance_fraction=1.0).at(0)
    assert not torch.equal(entering.latents, mixed.latents)  # the pool passes the option on to its clips
    plain = ClipPool(vae, slots=3, seed=5, refresh_every=2).at(9)
    again = ClipPool(vae, slots=3, seed=5, refresh_every=2, memory_fraction=0.0).at(9)
    assert plain.captions == again.captions and torch.equal(plain.latents, again.latents)  # 0 = unchanged draws


def test_entrance_clips_start_empty_and_show_the_object_coming_in():
    from packforcing.world.memory import ENTRANCE_GAP_S, training_clip, visible

    fps, kinds = 16, []
    for k in range(40):
        scene, start = training_clip(np.random.default_rng(k), entrance_fraction=0.5)
        shown = visible(scene, 77, 64, 64, start=start)[:, 0]
        kinds.append(not shown[0])
        if not shown[0]:  # an entrance clip: empty from the scene's start until gap / 2, then in view
            first = int(np.argmax(shown))
            assert start == 0 and shown.any() and ENTRANCE_GAP_S[0] / 2 * fps - 1 <= first <= ENTRANCE_GAP_S[1] / 2 * fps + 1
            assert shown[first:first + 8].all()  # it stays in view once it is in (it crosses the frame)
    assert 0.25 < np.mean(kinds) < 0.75  # about half are entrance clips
    # without the option the draws are those of the function before it (rounds 1-3 stay reproducible)
    for k in range(6):
        a, b = training_clip(np.random.default_rng(k)), training_clip(np.random.default_rng(k), entrance_fraction=0.0)
        assert a[1] == b[1] and a[0] == b[0]


@pytest.fixture
def exported_init(toy_run, tmp_path):
    """A toy run trained one transformer step and exported to ``tmp_path / "init"``."""
    import shutil

    shutil.copytree(toy_run, tmp_path / "run")
    train_v2.train_transformer(dataclasses.replace(TOY, transformer_steps=1), tmp_path / "run", resume=False,
                               progress=False)
    return train_v2.export(TOY, tmp_path / "run", tmp_path / "init")


def test_memory_phase_fine_tunes_an_exported_model_and_exports_it(exported_init, tmp_path):
    from packforcing.tiny_world import load_tiny_world

    cfg = dataclasses.replace(TOY, memory_init=str(exported_init), memory_steps=2, memory_fraction=1.0)
    losses = train_v2.train_memory(cfg, tmp_path / "mem", resume=False, progress=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    train_v2.export_memory(cfg, tmp_path / "mem", tmp_path / "tuned")
    init, tuned = load_tiny_world(exported_init), load_tiny_world(tmp_path / "tuned")
    a, b = init.transformer.state_dict(), tuned.transformer.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # the EMA moved
    va, vb = init.vae.vae.state_dict(), tuned.vae.vae.state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)  # the VAE is the init's
    manifest = json.loads((tmp_path / "tuned" / "tiny_world.json").read_text())
    assert manifest["memory_finetune"]["steps"] == 2 and manifest["world"] == "v2"
    # a second round on the tuned model keeps the first round's note and adds its own
    second = dataclasses.replace(cfg, memory_init=str(tmp_path / "tuned"), memory_fraction=0.3)
    train_v2.export_memory(second, tmp_path / "mem", tmp_path / "tuned2")
    manifest2 = json.loads((tmp_path / "tuned2" / "tiny_world.json").read_text())
    assert manifest2["memory_finetune"] == manifest["memory_finetune"]
    assert manifest2["memory_finetune_2"]["config"]["memory_fraction"] == 0.3


def test_memory_phase_can_deepen_the_model_and_exports_the_deeper_one(exported_init, tmp_path):
    from packforcing.tiny_world import load_tiny_world

    cfg = dataclasses.replace(TOY, memory_init=str(exported_init), memory_steps=2, memory_grow_layers=TOY.layers + 1)
    losses = train_v2.train_memory(cfg, tmp_path / "mem", resume=False, progress=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    train_v2.export_memory(cfg, tmp_path / "mem", tmp_path / "deeper")
    deeper = load_tiny_world(tmp_path / "deeper")
    assert deeper.transformer.config.num_layers == TOY.layers + 1 == len(deeper.transformer.blocks)
    assert deeper.generate("a red circle bouncing over a navy background", seconds=1, policy="full", seed=0).shape[0] > 0


def test_outline_marks_both_sides_of_every_edge_and_nothing_else():
    from packforcing.training.stages import outline

    mask = torch.zeros(1, 1, 2, 12, 12)
    mask[:, :, 0, 3:8, 4:9] = 1  # a 5x5 square in frame 0, frame 1 empty
    ring = outline(mask)[0, 0]
    assert ring[1].sum() == 0 and ring[0, 5, 6] == 0  # no edge in frame 1, none at the square's centre
    assert ring[0, 3, 4] == 1 and ring[0, 2, 3] == 1  # the corner pixel and its outer diagonal neighbour
    assert ring[0, 0, 0] == 0 and ring[0, 10, 10] == 0  # far from the square
    inner, outer = ring[0] * mask[0, 0, 0], ring[0] * (1 - mask[0, 0, 0])
    assert int(inner.sum()) == 5 * 5 - 3 * 3 and int(outer.sum()) == 7 * 7 - 5 * 5


def test_edge_weight_counts_an_outline_error_more_than_the_same_error_inside(monkeypatch):
    from packforcing.training import stages

    x = torch.full((1, 3, 1, 16, 16), -1.0)
    x[:, :, :, 4:12, 4:12] = 1.0  # a white square on black
    monkeypatch.setattr(stages, "vae_batch", lambda *a, **k: x.clone())

    class Echo(torch.nn.Module):  # a VAE whose reconstruction is its input plus a chosen error
        device = torch.device("cpu")

        def __init__(self, error):
            super().__init__()
            self.error, self.encoder, self.quant_conv = error, torch.nn.Identity(), torch.nn.Identity()

        def encode(self, v):
            return type("E", (), {"latent_dist": type("D", (), {"mean": v * 0})()})()

    def loss(error, edge_weight):
        vae = Echo(error)
        monkeypatch.setattr(stages, "decode_unclamped", lambda _vae, z: x + vae.error)
        cfg = stages.VAEStageConfig(frames=1, crop=16, latent_noise=0.0, train_encoder=False, colour_from=None,
                                    anchor_weight=0.0, edge_weight=edge_weight)
        return float(stages.VAEStage(vae, cfg).loss(0))

    on_edge, inside = torch.zeros_like(x), torch.zeros_like(x)
    on_edge[:, :, :, 4, 6] = 0.5
    inside[:, :, :, 8, 8] = 0.5
    assert loss(on_edge, 0.0) == pytest.approx(loss(inside, 0.0))
    assert loss(on_edge, 8.0) > 3 * loss(inside, 8.0)


def test_vae_sharp_phase_trains_the_decoder_only_and_exports_the_model_with_it(exported_init, tmp_path):
    from packforcing.tiny_world import load_tiny_world

    cfg = dataclasses.replace(TOY, vae_sharp_init=str(exported_init), vae_sharp_steps=2, vae_sharp_frames=5)
    losses = train_v2.train_vae_sharp(cfg, tmp_path / "sharp", resume=False, progress=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    train_v2.export_vae_sharp(cfg, tmp_path / "sharp", tmp_path / "tuned")
    init, tuned = load_tiny_world(exported_init), load_tiny_world(tmp_path / "tuned")
    a, b = init.vae.vae, tuned.vae.vae
    assert all(torch.equal(v, b.encoder.state_dict()[k]) for k, v in a.encoder.state_dict().items())
    assert any(not torch.equal(v, b.decoder.state_dict()[k]) for k, v in a.decoder.state_dict().items())
    assert a.config.latents_mean == b.config.latents_mean  # the transformer's latent space is unchanged
    ta, tb = init.transformer.state_dict(), tuned.transformer.state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    manifest = json.loads((tmp_path / "tuned" / "tiny_world.json").read_text())
    assert manifest["vae_sharp"]["steps"] == 2


def test_probe_repeats_every_prompt_with_distinct_held_out_seeds():
    from analysis.probe import probe
    from packforcing.training.v2 import EVAL_SEED_BASE_V2, HELDOUT_V2

    calls = []

    def blank(prompt, seed, seconds):
        calls.append((prompt, seed))
        return np.zeros((5, 64, 64, 3), np.uint8)

    table, videos = probe(blank, seconds=1, every=2, seeds=2)
    assert len(table) == len(videos) == 2 * len(HELDOUT_V2)
    assert list(table["prompt"]) == [p for p in HELDOUT_V2 for _ in range(2)]
    assert len(set(table["seed"])) == len(table) and (table["seed"] >= EVAL_SEED_BASE_V2).all()
    assert calls == list(zip(table["prompt"], table["seed"]))
    assert (table["strict_fidelity"] == 0).all()  # a blank video draws no prompted object
    assert (table["shape_found"] == 0).all() and (table["extra_object_frames"] == 0).all()


def test_grown_transformer_computes_what_the_trained_one_does_and_then_learns():
    from packforcing.training.grow import grow_layers, identity_layout
    from packforcing.model import block_causal_mask

    assert identity_layout(4, 6) == [0, 1, None, 2, 3, None]
    assert identity_layout(2, 3) == [0, 1, None] and identity_layout(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot grow"):
        identity_layout(4, 3)
    torch.manual_seed(0)
    model = train_v2.build_transformer(TOY).eval()
    with torch.no_grad():
        for p in model.parameters():  # a "trained" model: no zero gates or projections anywhere
            p.add_(0.05 * torch.randn_like(p))
    grown = grow_layers(model, TOY.layers + 2)
    assert grown.config.num_layers == TOY.layers + 2 and len(grown.blocks) == TOY.layers + 2
    x = torch.randn(1, 16, 8, 8, 8)
    t = torch.cat([torch.zeros(1, 4), torch.full((1, 4), 600.0)], dim=1)
    text = torch.randn(1, 16, TOY.text_dim)
    mask = block_causal_mask(8, 4)
    assert torch.allclose(grown.forward_sequence(x, t, text, frame_mask=mask),
                          model.forward_sequence(x, t, text, frame_mask=mask), atol=1e-5)
    grown.train()
    grown.forward_sequence(x, t, text, frame_mask=mask).pow(2).mean().backward()
    new_out = grown.blocks[2].ffn.net[-1].weight  # zero now, but it gets a gradient: the block learns
    assert new_out.abs().max() == 0 and new_out.grad.abs().max() > 0
