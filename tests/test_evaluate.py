"""The evaluation command's quick path: one table with every policy and the expected columns."""

import pandas as pd
import pytest

from analysis.evaluate import TABLE_COLUMNS, main, policy_specs


def test_quick_evaluation_writes_the_table(tmp_path):
    assert main(["--quick", "--out", str(tmp_path), "--no-strips"]) == 0
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table.columns) == TABLE_COLUMNS
    expected = ["ground truth (world generator)"] + [s.label for s in policy_specs(quick=True)]
    assert list(table["policy"]) == expected
    gt = table.iloc[0]
    assert gt["fidelity"] == 1.0 and gt["background_similarity"] == 1.0
    generated = table.iloc[1:]
    assert (generated["peak_kv_MB"] > 0).all() and (generated["s_per_block"] > 0).all()
    pf = generated[generated["policy"].str.startswith("packforcing")]
    full = generated[generated["policy"] == "full"]
    assert (pf["peak_kv_tokens"] <= full["peak_kv_tokens"].iloc[0]).all()
    md = (tmp_path / "table.md").read_text()
    assert "| policy |" in md and "packforcing trained (HR+LR)" in md
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert len(runs) == len(expected)


def test_policy_specs_include_deep_sink_only_when_available():
    labels = [s.label for s in policy_specs(available=["full", "window", "sink_window", "packforcing"])]
    assert not any(label.startswith("deep_sink") for label in labels) and len(labels) == 9
    assert any(s.policy == "deep_sink" for s in policy_specs(available=["deep_sink"]))


def test_v2_evaluation_uses_the_v2_heldout_prompts_and_world():
    from analysis.evaluate import ground_truth, heldout_prompts, score
    from packforcing.training.v2 import EVAL_SEED_BASE_V2, HELDOUT_V2

    pairs = heldout_prompts(2, 1, world="v2")
    assert pairs == [(HELDOUT_V2[1], EVAL_SEED_BASE_V2 + 1), (HELDOUT_V2[2], EVAL_SEED_BASE_V2 + 2)]
    prompt, seed = pairs[0]
    video = ground_truth(prompt, seed, 2, 64, 64, world="v2")
    row = score(video, prompt)
    assert row["strict_fidelity"] > 0.9 and row["fidelity"] == 1.0 and row["objects"] == pytest.approx(2, abs=0.2)


def test_runs_without_the_strict_columns_still_summarize():
    import pandas as pd

    from analysis.evaluate import METRIC_COLUMNS, summarize_runs

    old = pd.DataFrame([dict(length_s=5.0, policy="window", prompt="p", seed=1, fidelity=0.5, peak_kv_MB=1.0,
                             s_per_block=0.1, first_block_s=0.1, wall_s=1.0, peak_kv_tokens=10)])
    table = summarize_runs(old)
    assert table["fidelity"].iloc[0] == 0.5 and table["strict_fidelity"].isna().all()
    assert set(METRIC_COLUMNS) <= set(table.columns)


def test_compare_strip_stacks_ground_truth_and_the_main_policies_in_run_order(tmp_path):
    import imageio.v2 as imageio

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    runs = pd.read_csv(tmp_path / "runs.csv")
    compares = sorted(tmp_path.glob("*_compare.png"))
    assert len(compares) == 1
    main_labels = [p for p in dict.fromkeys(runs["policy"]) if not p.startswith(" ")]
    assert main_labels[0] == "ground truth (world generator)" and len(main_labels) < runs["policy"].nunique()
    strips = sorted((tmp_path / "strips").glob("*.png"))
    one = imageio.imread(strips[0])
    stacked = imageio.imread(compares[0])
    assert stacked.shape == (one.shape[0] * len(main_labels), one.shape[1], 3)
    # the top row is the ground truth's strip, the second the first policy's
    gt = next(p for p in strips if "ground_truth" in p.name)
    assert (stacked[: one.shape[0]] == imageio.imread(gt)).all()
