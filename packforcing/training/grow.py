"""Deepen a trained transformer without changing what it computes (identity-initialised blocks).

A Wan block adds three residual branches (self-attention, cross-attention, FFN) to its input; with
the output projection of each branch at zero the block is the identity, so a model with such blocks
inserted predicts exactly what the trained model does, and fine-tuning starts from there (the
gradient of each zero projection is not zero, so the new blocks learn from the first step).
"""

from __future__ import annotations

import torch

from ..model import CausalWanTransformer


def identity_layout(num_layers: int, target_layers: int) -> list[int | None]:
    """Which trained block sits at each layer of the deeper model (None = a new identity block):
    the new blocks are spread evenly, each after a run of trained ones (4 -> 6: [0, 1, None, 2, 3, None])."""
    if target_layers < num_layers:
        raise ValueError(f"cannot grow {num_layers} layers to {target_layers}")
    extra = target_layers - num_layers
    layout, done = [], 0
    for j in range(extra):
        upto = round((j + 1) * num_layers / extra)
        layout += list(range(done, upto)) + [None]
        done = upto
    return layout + list(range(done, num_layers))


@torch.no_grad()
def grow_layers(model: CausalWanTransformer, target_layers: int) -> CausalWanTransformer:
    """A `CausalWanTransformer` with `target_layers` blocks: the trained blocks of `model` (copied),
    new blocks with zeroed output projections in between (`identity_layout`), the rest shared."""
    layout = identity_layout(model.config.num_layers, target_layers)
    grown = CausalWanTransformer.from_config(model.config, num_layers=target_layers,
                                             patch_size=tuple(model.config.patch_size))
    grown = grown.to(next(model.parameters()).device)
    outside_blocks = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    missing, unexpected = grown.load_state_dict(outside_blocks, strict=False)
    if unexpected or any(not k.startswith("blocks.") for k in missing):
        raise RuntimeError(f"grow_layers: unexpected keys {unexpected}, missing {missing}")
    for block, source in zip(grown.blocks, layout):
        if source is not None:
            block.load_state_dict(model.blocks[source].state_dict())
            continue
        for linear in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[-1]):
            linear.weight.zero_()
            linear.bias.zero_()
    return grown.train(model.training)


__all__ = ["grow_layers", "identity_layout"]
