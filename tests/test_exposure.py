"""analysis.exposure: per-block scores land in the right blocks, and the summary is their mean."""

import numpy as np
import pandas as pd

from analysis.exposure import block_scores, summarise
from packforcing.world import Scene, world_spec


def test_block_scores_score_each_block_on_its_own_frames():
    world = world_spec("v2")
    prompt = "a red circle bouncing over a navy background"
    video = Scene.from_caption(prompt, seed=3, world=world).render(4 * 12 - 3, world.height, world.width)  # 3 blocks
    navy = video[0, 0, 0].copy()
    video[13:29] = navy  # block 1 (pixel frames 13..28) emptied: only the background is left
    rows = block_scores(video, prompt, [0, 1, 2])
    assert [r["block"] for r in rows] == [0, 1, 2]
    assert rows[0]["strict_fidelity"] > 0.9 and rows[2]["strict_fidelity"] > 0.9
    assert rows[1]["strict_fidelity"] == 0 and rows[1]["objects"] == 0


def test_summarise_means_per_block_and_source_and_over_later_blocks():
    table = pd.DataFrame([
        {"source": s, "block": b, "strict_fidelity": v}
        for s, b, v in [("free", 0, 0.2), ("free", 1, 0.4), ("free", 2, 0.6), ("free", 1, 0.2),
                        ("teacher", 1, 0.5), ("teacher", 2, 0.7), ("recon", 0, 1.0), ("recon", 1, 0.8)]])
    wide = summarise(table)
    assert list(wide.columns) == ["recon", "teacher", "free"]
    assert np.isclose(wide.loc[1, "free"], 0.3) and np.isnan(wide.loc[0, "teacher"])
    assert np.isclose(wide.loc["blocks>=1", "free"], (0.4 + 0.6 + 0.2) / 3)
    assert np.isclose(wide.loc["blocks>=1", "teacher"], 0.6) and np.isclose(wide.loc["blocks>=1", "recon"], 0.8)
