"""Issue 11: the store / plan / context seam, attention through diffusers' dispatcher, no host reads
inside attention, and the bugs found in review."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from packforcing.cache import POLICIES, make_policy
from packforcing.cache.plan import BlockPlan, MidSelection
from packforcing.compressor import Compressor
from packforcing.configs import TINY
from packforcing.model import AttentionCall, CacheAttnProcessor
from packforcing.rope import Rope3D
from packforcing.sampler import SamplerConfig, generate_blocks
from packforcing.trace import TraceRecorder
from tests.conftest import SyntheticDriver, tiny_geometry

B = 4


def build(name, geometry=None, **options):
    geometry = geometry or tiny_geometry(B, frame_hw=(4, 4))
    offsets = Compressor.token_centres(geometry.block_frames, 8, 8)[0]
    return make_policy(name, geometry, compressed_t_offsets=offsets, **options)


def holds_tensors(obj, seen=None) -> bool:
    """Whether ``obj`` reaches a tensor through its attributes, lists, tuples or dicts."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (list, tuple, set)):
        return any(holds_tensors(x, seen) for x in obj)
    if isinstance(obj, dict):
        return any(holds_tensors(x, seen) for x in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return any(holds_tensors(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return any(holds_tensors(v, seen) for k, v in vars(obj).items() if k != "geometry")
    return False


# -- the pure policy -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_are_pure_and_plan_without_a_model(name):
    """Every policy plans a 40-block video from metadata alone: no tensors, no store, no model."""
    policy = build(name)
    policy.reset(40)
    for b in range(40):
        plan = policy.plan(b)
        assert isinstance(plan, BlockPlan) and not holds_tensors(plan)
        assert plan.attend_tokens == policy.attended_tokens()
        policy.commit(plan)
    assert not holds_tensors(policy)


def test_packforcing_plan_names_regions_evictions_and_selection():
    policy = build("packforcing", sink_frames=4, recent_frames=4, top_k=2, archive_blocks=3)
    policy.reset(10)
    plans = []
    for b in range(7):
        plans.append(policy.plan(b))
        policy.commit(plans[-1])
    assert plans[0].commit.region == "sink" and not plans[0].compress
    assert plans[1].commit.region == "recent" and plans[1].commit.evicted is None and plans[1].compress
    p2 = plans[2]  # block 1 leaves recent: its backup is archived in slot 0
    assert p2.commit.evicted.block == 1 and p2.commit.archive_slot == 0
    p5 = plans[5]  # archive full (blocks 1, 2, 3): block 4 goes to block 1's slot, block 1 is dropped
    assert [h.block for h in p5.selection.candidates] == [1, 2, 3]
    assert p5.commit.dropped.block == 1 and p5.commit.archive_slot == 0
    sel = plans[6].selection
    assert isinstance(sel, MidSelection) and [h.block for h in sel.candidates] == [2, 3, 4]
    assert sel.count == 2 and sel.starts == (4.0, 8.0)  # after the 4-frame sink, span 4
    assert plans[6].current_pos == 4 + 2 * 4 + 4  # sink + 2 mid + 1 recent
    assert dict(plans[6].held) == {"sink": plans[6].held[0][1], "recent": plans[6].held[1][1]}


def test_release_keeps_the_policy_reusable(tiny_model):
    """Bug: release() dropped every tensor attribute (score_heads, t_offsets) and a second run raised
    TypeError. The sampler releases the store; the same policy object runs again, identically."""
    compressor = Compressor(TINY["num_attention_heads"] * TINY["attention_head_dim"], mode="hr").eval()
    geometry = tiny_geometry(4, (4, 4), TINY["num_layers"], TINY["num_attention_heads"], 32)
    policy = make_policy("packforcing", geometry, compressed_t_offsets=compressor.token_centres(4, 8, 8)[0],
                         sink_frames=4, recent_frames=4, top_k=1, archive_blocks=2)

    def run():
        blocks = generate_blocks(tiny_model, torch.ones(1, 4, 64), policy, 5, (8, 8), SamplerConfig(), seed=2,
                                 compressor=compressor)
        return torch.cat([b.latents for b in blocks], 2)

    assert torch.equal(run(), run())


# -- no host reads inside attention ----------------------------------------------------------------
class HostReadError(AssertionError):
    pass


@pytest.fixture()
def no_host_reads(monkeypatch):
    """While active, anything that copies a tensor's values to Python (tolist, item, float, bool,
    cpu, numpy) or builds a tensor from Python lists raises."""
    state = {"on": False}

    def guard(name, original):
        def wrapped(*args, **kwargs):
            if state["on"]:
                raise HostReadError(f"host read in attention: {name}")
            return original(*args, **kwargs)
        return wrapped

    for name in ("tolist", "item", "__float__", "__bool__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", guard("torch.tensor", torch.tensor))
    return state


@pytest.mark.parametrize("name,options", [
    ("packforcing", dict(sink_frames=4, recent_frames=4, top_k=2, archive_blocks=4)),
    ("packforcing", dict(sink_frames=4, recent_frames=4, top_k=2, archive_blocks=4, mid_span="single")),
    ("packforcing", dict(sink_frames=4, recent_frames=8, top_k=2, archive_blocks=4, scope="shared")),
    ("deep_sink", dict(sink_frames=4, recent_frames=4, keep_tokens=20)),
    ("sink_window", {}),
])
def test_attention_calls_never_read_the_device(name, options, no_host_reads):
    """Every ``score`` / ``update`` / ``update_compressed`` call (per layer, inside attention) runs
    without a host read; index and delta tensors are made once per block in ``store.apply``."""
    policy = build(name, tiny_geometry(B, frame_hw=(2, 2)), **options)
    driver = SyntheticDriver(policy, steps=1, compressed_hw=(torch.zeros(policy.compressed_tokens
                                                                        if policy.compresses else 0),) * 2)

    def on_store(store):
        for method in ("take_queries", "update", "update_compressed"):
            original = getattr(store, method)

            def guarded(*args, _original=original, **kwargs):
                no_host_reads["on"] = True
                try:
                    return _original(*args, **kwargs)
                finally:
                    no_host_reads["on"] = False
            setattr(store, method, guarded)

    driver.on_store = on_store
    driver.rollout(14)
    assert policy.attended_tokens() > policy.geometry.tokens_per_block * 2  # history was attended


# -- attention through diffusers' dispatcher -------------------------------------------------------
def test_dispatch_attention_equals_the_previous_sdpa(tiny_model):
    """The processor calls diffusers' dispatch_attention_fn; on CPU this is bit-identical to the SDPA
    call it replaced, with a mask (plain forward) and with cache views (non-contiguous keys)."""
    attn = tiny_model.blocks[0].attn1
    proc = CacheAttnProcessor(tiny_model.rope3d)
    x = torch.randn(1, 32, TINY["num_attention_heads"] * TINY["attention_head_dim"])
    cos, sin = tiny_model.rope3d.cos_sin(Rope3D.grid(2, 4, 4))
    mask = torch.rand(32, 32) > 0.3
    mask |= torch.eye(32, dtype=torch.bool)

    def previous(keys_values=None, attn_mask=None):  # the old processor body, with F.scaled_dot_product_attention
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        q, k = proc.rope.apply_tokens(q, cos, sin), proc.rope.apply_tokens(k, cos, sin)
        keys, values = keys_values(k, v) if keys_values else (k.transpose(1, 2), v.transpose(1, 2))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=attn_mask)
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2, 3)))

    with torch.no_grad():
        assert torch.equal(proc(attn, x, rotary_emb=AttentionCall(cos, sin, 0, None, mask=mask)), previous(None, mask))
        geometry = tiny_geometry(2, (4, 4), TINY["num_layers"], TINY["num_attention_heads"], 32)
        policy = make_policy("full", geometry)
        store = policy.allocate(3)
        for b in range(2):  # two committed blocks of random history
            plan = policy.plan(b)
            store.workspace.keys[:, :, :, :32].normal_()
            store.workspace.values[:, :, :, :32].normal_()
            store.commit(plan)
            policy.commit(plan)
        plan = policy.plan(2)
        ctx = store.context(plan, 0)
        got = proc(attn, x, rotary_emb=AttentionCall(cos, sin, 0, ctx))
        assert torch.equal(got, previous(lambda k, v: ctx.update(0, k, v)))


def test_inherited_forward_falls_back_to_the_stock_processor(tiny_model):
    """Bug: after the cache processors were installed, WanTransformer3DModel.forward raised
    ('tuple' object has no attribute 'cos'). Without an AttentionCall the stock processor runs."""
    x, t, text = torch.randn(1, 16, 3, 8, 12), torch.tensor([500.0]), torch.randn(1, 7, 64)
    ref = WanTransformer3DModel(**TINY).eval()
    ref.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        tiny_model.forward_sequence(x, t, text)  # installs the cache processors
        assert isinstance(tiny_model.blocks[0].attn1.processor, CacheAttnProcessor)
        out = WanTransformer3DModel.forward(tiny_model, x, t, text).sample
        assert torch.equal(out, ref(x, t, text).sample)


# -- top-k scoring at the positions attention uses -------------------------------------------------
@pytest.mark.parametrize("mid_span", ["span", "compressed", "single"])
def test_topk_scores_use_the_positions_attention_sees(mid_span):
    """Bug: scoring rotated each mid block at its unscaled token offsets, but attention sees token j
    at ``start + t_j·span/B_f``. The score must equal q·Σ_j k_j with every k_j freshly rotated to
    that position (candidate m placed at ``scoring_starts[m]``), for every mid_span."""
    policy = build("packforcing", tiny_geometry(B, frame_hw=(4, 4)), sink_frames=4, recent_frames=4, top_k=2,
                   archive_blocks=6, mid_span=mid_span)
    t_off, h_off, w_off = Compressor.token_centres(B, 8, 8)
    assert len(set(t_off.tolist())) == 2  # two tokens at distinct temporal offsets
    driver = SyntheticDriver(policy, steps=1, compressed_hw=(h_off, w_off))
    g, checked = policy.geometry, []

    def on_view(block, step, layer, keys, values):
        sel = driver.plan.selection
        if step != 0 or sel is None or len(sel.candidates) < 3:
            return
        store, n_c = driver.store, policy.compressed_tokens
        q = driver.rotated(driver.raw(block, layer, "qnoisy0", g.tokens_per_block), driver.block_positions(
            driver.plan.current_pos))
        got = store._scores(layer, q)
        heads = torch.arange(0, g.num_heads, 2)
        queries = torch.cat([store.recent_queries[layer].index_select(1, store.recent_slots).flatten(1, 2),
                             store._query_sample(q)], dim=1)
        ref = []
        for m, held in enumerate(sel.candidates):
            pos = driver.compressed_positions(0.0)
            pos[:, 0] = sel.scoring_starts[m] + torch.tensor(policy.t_offsets, dtype=torch.float64) * policy.span / B
            k = driver.rotated(driver.raw(held.block, layer, "kc", n_c), pos)[:, :, heads].sum(1)  # [B, Hs, d]
            ref.append(torch.einsum("bnhd,bhd->bnh", queries, k).mean() / math.sqrt(g.head_dim))
        torch.testing.assert_close(got, torch.stack(ref), rtol=1e-5, atol=1e-5)
        checked.append(block)

    driver.rollout(10, on_view=on_view)
    assert checked


# -- deep_sink keeps its kept keys at their entry position -----------------------------------------
def kept_key_error(blocks: int) -> float:
    """Largest |attended kept key − bf16-free reference| after ``blocks`` bf16 blocks of deep_sink."""
    geometry = dataclasses.replace(tiny_geometry(B, frame_hw=(2, 2)), dtype=torch.bfloat16)
    policy = make_policy("deep_sink", geometry, sink_frames=4, recent_frames=4, keep_tokens=24)
    driver = SyntheticDriver(policy, steps=0)
    driver.rollout(blocks)
    store, n, T, worst = driver.store, policy.kept_tokens, geometry.tokens_per_block, 0.0
    grid = driver.block_positions(0.0)
    for layer in range(geometry.num_layers):
        got = store.workspace.keys[layer, :, :, policy.kept_offset : policy.kept_offset + n].float()
        for i in range(n):
            blk, j = divmod(int(store.kept_source[layer, i]), T)
            pos = grid[j : j + 1].clone()
            pos[0, 0] = float(store.kept_pos[layer, i])
            ref = driver.rotated(driver.raw(blk, layer, "k", T)[:, j : j + 1], pos)[:, 0]
            worst = max(worst, float((got[:, :, i] - ref).abs().max()))
    return worst


def test_deep_sink_kept_keys_do_not_drift_in_bf16():
    """Bug: deep_sink re-rotated kept bf16 keys in place block after block, accumulating rounding
    (measured before the fix: 0.030 after 8 blocks, 0.035 after 60). Kept keys now stay at their
    entry position and attention reads a rotated copy: about one bf16 rounding step (keys |k| < 8,
    ulp 1/32 at most), and no growth with the number of blocks (0.020 / 0.018 measured)."""
    early, late = kept_key_error(8), kept_key_error(60)
    assert early < 0.025 and late < 0.025
    assert late <= early + 1e-3


# -- the recorder reads plans after the block ------------------------------------------------------
def test_recorder_is_fed_after_the_block_not_from_attention(tiny_model):
    compressor = Compressor(TINY["num_attention_heads"] * TINY["attention_head_dim"], mode="hr").eval()
    geometry = tiny_geometry(4, (4, 4), TINY["num_layers"], TINY["num_attention_heads"], 32)
    policy = make_policy("packforcing", geometry, compressed_t_offsets=compressor.token_centres(4, 8, 8)[0],
                         sink_frames=4, recent_frames=4, top_k=1, archive_blocks=3)
    recorder, seen, during = TraceRecorder(), [], []
    original = tiny_model.forward_block

    def forward_block(*args, **kwargs):  # no row may appear while a forward (attention) runs
        before = sum(len(rows) for rows in recorder._rows.values())
        out = original(*args, **kwargs)
        during.append(sum(len(rows) for rows in recorder._rows.values()) - before)
        return out

    tiny_model.forward_block = forward_block
    try:
        for block in generate_blocks(tiny_model, torch.ones(1, 4, 64), policy, 5, (8, 8), SamplerConfig(), seed=1,
                                     compressor=compressor, recorder=recorder):
            seen.append(len(recorder._rows["occupancy"]))
            assert block.plan.block == block.index
    finally:
        del tiny_model.forward_block
    assert during and set(during) == {0}
    assert len(recorder.tables()["scores"]) > 0
    steps = len(SamplerConfig().timesteps) + 1
    assert seen == [(i + 1) * steps * TINY["num_layers"] * 5 for i in range(5)]  # 5 partitions, every step, layer


# -- smaller review bugs -------------------------------------------------------------------------
def test_cross_attention_kv_computed_once_per_prompt(tiny_model):
    """Bug: the prompt's cross-attention K/V were recomputed in every forward. The sampler prepares
    them once (`prompt_context`); the video is bit-identical to recomputing them each forward."""
    geometry = tiny_geometry(4, (4, 4), TINY["num_layers"], TINY["num_attention_heads"], 32)
    text = torch.randn(1, 6, 64)
    calls = []
    hook = tiny_model.blocks[0].attn2.to_k.register_forward_hook(lambda *a: calls.append(1))
    try:
        cached = [b.latents for b in generate_blocks(tiny_model, text, make_policy("full", geometry), 3, (8, 8),
                                                     seed=4)]
    finally:
        hook.remove()
    assert len(calls) == 1  # 3 blocks × 5 forwards would be 15
    original = tiny_model.prompt_context
    tiny_model.prompt_context = lambda t: t  # every forward embeds the raw text again (the old path)
    try:
        recomputed = [b.latents for b in generate_blocks(tiny_model, text, make_policy("full", geometry), 3, (8, 8),
                                                         seed=4)]
    finally:
        del tiny_model.prompt_context
    assert tiny_model.prompt_context == original
    assert all(torch.equal(a, b) for a, b in zip(cached, recomputed))


def test_video_seconds_follow_fps_and_vae_ratio(tiny_model):
    """Bug: the sampler hard-coded 16 fps and the VAE's temporal ratio 4."""
    geometry = tiny_geometry(3, (4, 4), TINY["num_layers"], TINY["num_attention_heads"], 32)
    recorder = TraceRecorder()
    list(generate_blocks(tiny_model, torch.ones(1, 4, 64), make_policy("full", geometry), 2, (8, 8),
                         SamplerConfig(block_frames=3), recorder=recorder, fps=8, temporal_ratio=2))
    assert recorder.tables()["blocks"]["video_seconds"].tolist() == [(2 * 3 - 1) / 8, 2 * 3 / 8]


def test_gpu_duration_uses_the_models_blocks():
    """Bug: studio.gpu_duration assumed 1 s per block; the request's own block count is used now."""
    from packforcing import studio

    short = studio.RunRequest("p", 30.0, 0, "window", {}, None, "m", num_blocks=10, fps=16)
    long = dataclasses.replace(short, num_blocks=40)  # e.g. 3-frame blocks at a lower fps
    assert studio._request_duration(long) > studio._request_duration(short)
    assert studio._request_duration(short) == studio.gpu_duration(10)
    switched = dataclasses.replace(long, schedule=((15.0, "q"),))
    assert studio._request_duration(switched) == studio._request_duration(long)  # keep: no extra pass
    recached = dataclasses.replace(switched, prompt_switch="recache")  # 20 commit passes ~ 5 blocks more
    assert studio._request_duration(recached) == studio.blocks_gpu_duration(45)


def test_compressed_token_time_centres_follow_the_branch():
    """The HR branch's k3/s2/p1 convolution is centred at frame 2t'; the LR branch pools [2t', 2t'+1]."""
    assert Compressor.token_centres(4, 16, 16, mode="lr")[0].unique().tolist() == [0.5, 2.5]
    assert Compressor.token_centres(4, 16, 16, mode="hr")[0].unique().tolist() == [0.0, 2.0]
    assert Compressor.token_centres(4, 16, 16, mode="both")[0].unique().tolist() == [0.25, 2.25]
    hr = Compressor(TINY["num_attention_heads"] * TINY["attention_head_dim"], mode="hr")
    assert torch.equal(hr.centres(3, 16, 16)[0], Compressor.token_centres(3, 16, 16, mode="hr")[0])
    conv = hr.hr.net[0]
    assert conv.kernel_size[0] == 3 and conv.stride[0] == 2 and conv.padding[0] == 1  # output t' reads 2t'-1..2t'+1


def test_trace_hands_out_only_new_rows():
    """Bug: tables() rebuilt every table from all rows on every block (quadratic). new_rows gives
    each block's rows once; concatenated they are the full tables."""
    import pandas as pd

    rec = TraceRecorder()
    deltas = []
    for block in range(5):
        for layer in range(3):
            rec.occupancy(block, 0, layer, "sink", 10, 20)
            rec.mid_scores(block, layer, [0, 1], [0, 4], [4, 8], [0.5, 0.2], [True, False])
        rec.block_done(block, 0.1, 4, 1.0, 10, 20)
        deltas.append(rec.new_rows())
    assert [len(d["occupancy"]) for d in deltas] == [3] * 5 and [len(d["blocks"]) for d in deltas] == [1] * 5
    full = rec.tables()
    for name in full:
        joined = pd.concat([d[name] for d in deltas], ignore_index=True)
        pd.testing.assert_frame_equal(joined, full[name], check_dtype=True)
    assert all(len(df) == 0 for df in rec.new_rows().values())


def test_window_maps_from_self_forcing_local_attn_size():
    """`window` counts history only; Self-Forcing's local_attn_size counts the current block and sink too."""
    from packforcing.cache import window_from_local_attn_size

    assert window_from_local_attn_size(21, block_frames=3) == 18
    assert window_from_local_attn_size(15, block_frames=3, sink_frames=3) == 9
    with pytest.raises(ValueError, match="leaves no history"):
        window_from_local_attn_size(6, block_frames=3, sink_frames=3)


# -- files that do one job -----------------------------------------------------------------------
def _imports(path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_pipeline_and_tiny_world_import_one_way():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "packforcing"
    assert not {n for n in _imports(root / "pipeline.py") if "tiny_world" in n or "embedded" in n}
    assert ".pipeline" in _imports(root / "tiny_world.py")


def test_cache_studio_and_bench_modules_stay_small():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    files = [*root.glob("packforcing/cache/*.py"), *root.glob("packforcing/studio/*.py"), *root.glob("analysis/bench*.py"),
             *(root / p for p in ("app.py", "app_panels.py", "app_replay.py", "analysis/estimate.py", "analysis/model_spec.py", "packforcing/model.py",
                                  "packforcing/sampler.py", "packforcing/pipeline.py", "packforcing/trace.py",
                                  "packforcing/knobs.py"))]
    sizes = {f.relative_to(root).as_posix(): len(f.read_text().splitlines()) for f in files}
    assert len(sizes) >= 25 and max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}
