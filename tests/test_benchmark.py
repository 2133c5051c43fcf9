"""The performance page's target verdicts, on hand-made figures."""

import pandas as pd

from delving.benchmark import targets, training_table

PROFILE = pd.DataFrame({"operator": ["aten::convolution_backward", "aten::mkldnn_convolution", "aten::mm"],
                        "share": [0.40, 0.10, 0.10]})


def _row(model, ours, recipe, bf16=float("nan"), fraction=0.2):
    return {"model": model, "ours_images_per_s": ours, "recipe_images_per_s": recipe, "recipe_workers": 0,
            "speedup": ours / recipe, "ours_bf16_images_per_s": bf16, "bf16_over_fp32": bf16 / ours,
            "train_gflops": 30.0, "fraction_fp32_peak": 0.2, "fraction_bf16_peak": fraction}


def test_targets_judge_each_figure_and_bound_the_speedup_by_the_convolutions():
    training = pd.DataFrame([_row("deep30", 1500, 1000, bf16=2100), _row("small14", 2500, 1000, fraction=0.6)])
    text = "\n".join(targets(training, {"fp32": 170.0, "bf16": 400.0}, PROFILE))
    assert "deep30, trainer against the usual recipe**: 2.10x (bf16 autocast; fp32 1.50x), target 2x: met" in text
    assert "small14, trainer against the usual recipe**: 2.50x (fp32; fp32 2.50x), target 2x: met" in text
    assert "small14, share of the bf16 matmul peak**: 60%, target 50%: met" in text
    assert "deep30, share of the bf16 matmul peak**: 20%, target 50%: not met" in text
    # convolutions are 50 % of our step; fp32 speed-up 1.5 -> at most 1.5 / 0.5 = 3.0x the recipe
    assert "take 50% of our training step" in text and "at most 3.0x the recipe" in text


def test_without_native_bf16_only_fp32_counts_and_the_table_says_n_a():
    training = pd.DataFrame([_row("deep30", 1500, 1000, bf16=9000)])
    text = "\n".join(targets(training, {"fp32": 170.0, "bf16": 2.0}, PROFILE))
    assert "1.50x (fp32; fp32 1.50x), target 2x: not met" in text and "no native bf16" in text
    table = training_table({"training": [_row("deep30", 1500, 1000)]})
    assert table.loc[0, "delving.train bf16 (img/s)"] == "n/a" and table.loc[0, "speed-up"] == 1.5
