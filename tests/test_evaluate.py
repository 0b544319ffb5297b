"""The evaluation command's quick path: one table with every policy and the expected columns."""

import pandas as pd

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
