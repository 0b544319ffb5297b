"""Prompt schedules: parsing, cached generation with switches against one masked forward with
per-block prompts (keep and recache), what re-caching changes, and the mid-token attention record."""

import math

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from packforcing.cache import make_policy
from packforcing.compressor import Compressor
from packforcing.configs import TINY
from packforcing.model import CrossAttnProcessor
from packforcing.sampler import SamplerConfig, generate_blocks
from packforcing.schedule import PromptSchedule
from packforcing.trace import TraceRecorder
from tests.conftest import record_forward_calls, teacher_forcing_layout, tiny_geometry

HW = (8, 8)  # latent; 4x4 tokens per frame
FRAMES = 4


def geometry():
    return tiny_geometry(FRAMES, (4, 4), TINY["num_layers"], TINY["num_attention_heads"], 32)


@pytest.fixture(scope="module")
def compressor():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return Compressor(TINY["num_attention_heads"] * TINY["attention_head_dim"], mode="hr").eval()


def texts(n):
    gen = torch.Generator().manual_seed(11)
    return [torch.randn(1, 5, 64, generator=gen) * 2 for _ in range(n)]


# ---- parsing ---------------------------------------------------------------------------------------
def test_schedule_parses_the_text_form_and_cli_items():
    text = "# two prompts\n0: a red circle over black\n\n20 s: a blue square: over white  # comment\n2.5e1s: x"
    with pytest.raises(ValueError, match="line 5"):
        PromptSchedule.parse(text)
    schedule = PromptSchedule.parse(text.rsplit("\n", 1)[0])
    assert schedule.entries == ((0.0, "a red circle over black"), (20.0, "a blue square: over white"))
    assert PromptSchedule.parse(schedule.to_text()) == schedule
    assert PromptSchedule.from_items(["a cat: sleeping"]).entries == ((0.0, "a cat: sleeping"),)  # untimed = 0 s
    assert PromptSchedule.from_items(["10:b", "0:a"]).prompts == ["a", "b"]


@pytest.mark.parametrize("items, message", [
    (["5: late start"], "start at 0"),
    (["0: a", "0: b"], "increase"),
    (["0: a", "3:   "], "empty"),
    ([f"{i}: p" for i in range(17)], "at most 16"),
    (["0: " + "x" * 2001], "too long"),
])
def test_bad_schedules_are_refused_with_a_reason(items, message):
    with pytest.raises(ValueError, match=message):
        PromptSchedule.from_items(items)


def test_switches_land_on_the_first_block_starting_at_or_after_their_time():
    starts = [0.0, 0.8125, 1.8125, 2.8125, 3.8125]  # 13 then 16 pixel frames per block at 16 fps
    assert PromptSchedule.from_items(["0:a", "1:b", "3.8125:c"]).switch_blocks(starts, 5) == [0, 2, 4]
    with pytest.raises(ValueError, match="after the video ends"):
        PromptSchedule.from_items(["0:a", "4:b"]).switch_blocks(starts, 5)
    with pytest.raises(ValueError, match="same block"):
        PromptSchedule.from_items(["0:a", "1:b", "1.5:c"]).switch_blocks(starts, 5)


# ---- equivalence with one masked forward -----------------------------------------------------------
class SegmentedCross:
    """attn2 processors that give each token range its own prompt (the stock diffusers processor per
    range): a masked forward with per-block prompts, independent of the sampler's cross-attention."""

    def __init__(self, model, segments):
        self.model, self.segments = model, segments  # [(start token, end token, text [1, L, 64])]

    def __enter__(self):
        embed = self.model.condition_embedder.text_embedder
        segs = [(a, b, embed(t)) for a, b, t in self.segments]
        stock = WanAttnProcessor()

        class Segmented(CrossAttnProcessor):  # the model keeps processors of this type installed
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                         rotary_emb=None):
                return torch.cat([stock(attn, hidden_states[:, a:b], e) for a, b, e in segs], dim=1)

        self.model._install_processors()
        self.saved = [blk.attn2.processor for blk in self.model.blocks]
        for blk in self.model.blocks:
            blk.attn2.processor = Segmented()
        return self

    def __exit__(self, *exc):
        for blk, proc in zip(self.model.blocks, self.saved):
            blk.attn2.processor = proc


@pytest.mark.parametrize("mode", ["keep", "recache"])
def test_cached_generation_with_a_schedule_equals_one_masked_forward_with_per_block_prompts(tiny_model, mode):
    """full cache, 4 blocks, prompts p0 (blocks 0-1), p1 (block 2), p2 (block 3). ``keep``: clean block j
    carries the prompt it was generated with; ``recache``: everything block i sees carries prompt(i)."""
    num_blocks, prompts = 4, texts(3)
    prompt_of = [0, 0, 1, 2]
    config = SamplerConfig(block_frames=FRAMES, prompt_switch=mode)
    calls = record_forward_calls(tiny_model)
    try:
        blocks = list(generate_blocks(tiny_model, prompts[0], make_policy("full", geometry()), num_blocks, HW, config,
                                      seed=3, prompt_switches={2: prompts[1], 3: prompts[2]}))
    finally:
        del tiny_model.forward_block
    clean = torch.cat([b.latents for b in blocks], dim=2)
    frames, per_block = num_blocks * FRAMES, FRAMES * 16
    mask, positions = teacher_forcing_layout(num_blocks, FRAMES)
    for step in range(len(config.timesteps)):
        noisy = [c for c in calls if c["step"] == step and not c["commit"]]
        latents = torch.cat([clean] + [c["x"] for c in noisy], dim=2)
        timesteps = torch.cat([torch.zeros(frames)] + [c["t"].expand(FRAMES) for c in noisy])[None]
        # keep: one forward; recache: one forward per prompt, everything under that prompt
        groups = [None] if mode == "keep" else sorted(set(prompt_of))
        for group in groups:
            def prompt(b):
                return prompts[prompt_of[b] if group is None else group]
            segments = [(b * per_block, (b + 1) * per_block, prompt(b)) for b in range(num_blocks)]
            segments += [((num_blocks + b) * per_block, (num_blocks + b + 1) * per_block, prompt(b))
                         for b in range(num_blocks)]
            with torch.no_grad(), SegmentedCross(tiny_model, segments):
                out = tiny_model.forward_sequence(latents, timesteps, prompts[0], positions, mask)
            for b in range(num_blocks):
                if group is None or prompt_of[b] == group:
                    torch.testing.assert_close(out[:, :, frames + b * FRAMES: frames + (b + 1) * FRAMES],
                                               noisy[b]["out"], rtol=1e-5, atol=1e-5)


def _snapshot(store):
    return {name: t.clone() for name, t in store.buffers().items()}


def _run_with_hook(model, policy, prompt_texts, switch_at, config, compressor=None, num_blocks=6):
    """Generate with a switch at ``switch_at``, capturing the store's buffers and the policy's
    bookkeeping when block ``switch_at - 1`` is done ("before") and when the sampler plans block
    ``switch_at`` ("after": after the switch, and the re-cache if any)."""
    seen, stores = {}, []
    allocate, plan = policy.allocate, policy.plan

    def allocating(n, device=None):
        stores.append(allocate(n, device))
        return stores[-1]

    def planning(block):
        if block == switch_at and "after" not in seen:  # the replay plans past blocks only
            seen["after"] = (_snapshot(stores[0]), _bookkeeping(policy))
        return plan(block)

    policy.allocate, policy.plan = allocating, planning
    results = []
    for b in generate_blocks(model, prompt_texts[0], policy, num_blocks, HW, config, seed=9, compressor=compressor,
                             prompt_switches={switch_at: prompt_texts[1]}):
        results.append(b.latents)
        if b.index == switch_at - 1:
            seen["before"] = (_snapshot(stores[0]), _bookkeeping(policy))
    return results, seen


def _bookkeeping(policy):
    """The policy's plain state (held blocks, counters), copied."""
    import copy

    return {k: copy.deepcopy(v) for k, v in vars(policy).items()
            if k not in ("current", "plan", "allocate", "geometry", "config") and not callable(v)}


@pytest.mark.parametrize("policy_name, options", [
    ("full", {}), ("window", {"window_frames": 8}), ("sink_window", {"sink_frames": 4, "window_frames": 4}),
    ("packforcing", {"sink_frames": 4, "recent_frames": 4, "top_k": 2, "archive_blocks": 3, "selection": "recency"}),
])
def test_recache_under_the_same_prompt_rebuilds_the_cache_bit_for_bit(tiny_model, compressor, policy_name, options):
    """Replaying the commit passes under an unchanged prompt reproduces every buffer exactly, and the
    video equals the run without a switch: the replay rebuilds exactly the state generation built."""
    offsets = compressor.token_centres(FRAMES, *HW)[0]
    policy = make_policy(policy_name, geometry(), compressed_t_offsets=offsets, **options)
    text = texts(1)[0]
    config = SamplerConfig(block_frames=FRAMES, prompt_switch="recache")
    switched, seen = _run_with_hook(tiny_model, policy, [text, text.clone()], 4, config, compressor)
    before, after = seen["before"], seen["after"]
    assert before[1] == after[1]  # the same blocks held where they were
    for name, tensor in before[0].items():
        assert torch.equal(tensor, after[0][name]), name
    plain = list(generate_blocks(tiny_model, text, make_policy(policy_name, geometry(), compressed_t_offsets=offsets,
                                                               **options), 6, HW, config, seed=9,
                                 compressor=compressor))
    assert all(torch.equal(a, b.latents) for a, b in zip(switched, plain))


def test_recache_changes_the_held_entries_and_nothing_else(tiny_model, compressor):
    """PackForcing (top-k), switch at block 5 of 6: sink (1 block), recent (1 block) and the archive's
    compressed blocks are recomputed (changed); the archive slots never written stay as they were,
    and the policy's bookkeeping is unchanged."""
    offsets = compressor.token_centres(FRAMES, *HW)[0]
    options = dict(sink_frames=4, recent_frames=4, top_k=2, archive_blocks=5)
    policy = make_policy("packforcing", geometry(), compressed_t_offsets=offsets, **options)
    config = SamplerConfig(block_frames=FRAMES, prompt_switch="recache")
    _, seen = _run_with_hook(tiny_model, policy, texts(2), 5, config, compressor)
    (before, held_before), (after, held_after) = seen["before"], seen["after"]
    assert held_before == held_after
    T, n_c, p = policy.geometry.tokens_per_block, policy.compressed_tokens, policy
    ws_b, ws_a = before["workspace.0"], after["workspace.0"]
    sink = slice(p.sink_offset, p.sink_offset + T)
    recent = slice(p.recent_offset, p.recent_offset + T)
    assert not torch.allclose(ws_b[:, :, :, sink], ws_a[:, :, :, sink])
    assert not torch.allclose(ws_b[:, :, :, recent], ws_a[:, :, :, recent])
    archived = len(held_after["archive"])  # blocks 1..3 (block 4 is recent, its backup pending)
    assert archived == 3
    arch_b, arch_a = before["archive.0"], after["archive.0"]
    for slot in range(archived):
        tokens = slice(slot * n_c, (slot + 1) * n_c)
        assert not torch.allclose(arch_b[:, :, :, tokens], arch_a[:, :, :, tokens]), slot
    unused = slice(archived * n_c, None)
    assert torch.equal(arch_b[:, :, :, unused], arch_a[:, :, :, unused])
    assert not torch.allclose(before["backups.0"], after["backups.0"])


def test_keep_leaves_the_cache_untouched_at_a_switch(tiny_model, compressor):
    offsets = compressor.token_centres(FRAMES, *HW)[0]
    policy = make_policy("packforcing", geometry(), compressed_t_offsets=offsets, sink_frames=4, recent_frames=4,
                         top_k=2, archive_blocks=5)
    _, seen = _run_with_hook(tiny_model, policy, texts(2), 5, SamplerConfig(block_frames=FRAMES), compressor)
    for name, tensor in seen["before"][0].items():
        assert torch.equal(tensor, seen["after"][0][name]), name


def test_switches_are_recorded(tiny_model, compressor):
    offsets = compressor.token_centres(FRAMES, *HW)[0]
    policy = make_policy("packforcing", geometry(), compressed_t_offsets=offsets, sink_frames=4, recent_frames=4,
                         top_k=2, archive_blocks=5)
    recorder = TraceRecorder()
    prompts = texts(3)
    list(generate_blocks(tiny_model, prompts[0], policy, 6, HW, SamplerConfig(prompt_switch="recache"), seed=1,
                         compressor=compressor, recorder=recorder, prompt_switches={2: prompts[1], 5: prompts[2]}))
    sw = recorder.tables()["switches"]
    assert sw[["block", "prompt_index", "mode", "recached_blocks"]].values.tolist() == [
        [2, 1, "recache", 2], [5, 2, "recache", 5]]
    assert sw["video_seconds"].tolist() == pytest.approx([(13 + 16) / 16, (13 + 4 * 16) / 16])
    assert (sw["seconds"] > 0).all()
    with pytest.raises(ValueError, match="blocks 1..5"):
        next(generate_blocks(tiny_model, prompts[0], policy, 6, HW, seed=1, compressor=compressor,
                             prompt_switches={6: prompts[1]}))


# ---- the mid-token inspector's record ---------------------------------------------------------------
def test_mid_attention_is_the_attention_the_model_computes(tiny_model, compressor, monkeypatch):
    """The recorded mass of each selected mid token equals softmax(q·k/√d) of the queries and keys the
    attention processor used at the commit pass, for the sampled queries and scoring heads."""
    from packforcing.cache.context import AttentionContext

    offsets = compressor.token_centres(FRAMES, *HW)[0]
    grid = Compressor.output_grid(FRAMES, *HW)
    policy = make_policy("packforcing", geometry(), compressed_t_offsets=offsets, compressed_grid=grid,
                         sink_frames=4, recent_frames=4, top_k=2, archive_blocks=4)
    captured = {}
    score, update = AttentionContext.score, AttentionContext.update

    def spy_score(self, layer, q):
        if self.commit:
            captured[(self.block, layer, "q")] = q.clone()
        return score(self, layer, q)

    def spy_update(self, layer, k, v):
        keys, values = update(self, layer, k, v)
        if self.commit:
            captured[(self.block, layer, "k")] = keys.clone()
        return keys, values

    monkeypatch.setattr(AttentionContext, "score", spy_score)
    monkeypatch.setattr(AttentionContext, "update", spy_update)
    recorder = TraceRecorder()
    list(generate_blocks(tiny_model, texts(1)[0], policy, 7, HW, SamplerConfig(), seed=2, compressor=compressor,
                         recorder=recorder))
    tables = recorder.tables()
    mass = tables["mid_attention"]
    selected = tables["scores"].query("selected")
    assert set(zip(mass.block, mass.layer, mass.source_block)) == set(zip(selected.block, selected.layer,
                                                                          selected.candidate))
    store_like = policy.store_class(policy, policy.geometry)  # for the query sample size only
    n_q, heads = store_like.queries_per_block, torch.arange(0, policy.geometry.num_heads, 2)
    d = policy.geometry.head_dim
    checked = 0
    for (block, layer), rows in mass.groupby(["block", "layer"]):
        q, keys = captured[(block, layer, "q")], captured[(block, layer, "k")]  # [B,N,H,d], [B,H,T,d]
        idx = torch.linspace(0, q.shape[1] - 1, n_q).round().long()
        probs = torch.softmax(torch.einsum("bnhd,bhtd->bnht", q[:, idx][:, :, heads].float(),
                                           keys[:, heads].float()) / math.sqrt(d), dim=-1).mean(dim=(0, 1, 2))
        n_sel = rows["source_block"].nunique()
        mid = probs[policy.mid_offset: policy.mid_offset + n_sel * policy.compressed_tokens]
        assert rows["mass"].tolist() == pytest.approx(mid.tolist(), rel=1e-5, abs=1e-7)
        cells = [tuple(r) for r in rows[["token_t", "token_y", "token_x"]].values.tolist()]
        assert cells[: policy.compressed_tokens] == [tuple(int(i) for i in torch.unravel_index(torch.tensor(j), grid))
                                                     for j in range(policy.compressed_tokens)]
        checked += 1
    assert checked >= 2 * TINY["num_layers"]
