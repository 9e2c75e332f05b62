"""The compare report's ablation section: what each 4-bit stabiliser buys."""

import pytest

from mixprec.app.report import ablation_section
from mixprec.app.runner import Recipe, RunResult


def run(recipe: str, val_loss: float) -> RunResult:
    return RunResult(
        recipe, {}, "emulated", 10, val_loss, {"val_loss": val_loss}, 1.0, 0, 0.0, 0, 1.0
    )


def test_ablation_rows_show_the_loss_each_switched_off_stabiliser_costs():
    results = [
        run("bf16-mixed", 2.0),
        run("nvfp4-mixed", 2.04),
        run("nvfp4-mixed(rht=false)", 2.1),
        run("params=fp32,compute=nvfp4(sr_grad=false,weight_blocks=1x16),output=fp32", 2.2),
        run("mxfp4-mixed", 2.3),
    ]
    lines = ablation_section(results)
    text = "\n".join(lines)
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines if line.startswith("| ")}
    assert rows["nvfp4-mixed(rht=false)"][1] == "no rht"
    assert rows["nvfp4-mixed(rht=false)"][3] == f"{100 * (2.1 - 2.04) / 2.04:+.2f}%"
    assert rows["nvfp4-mixed(rht=false)"][4].rstrip(" |") == f"{100 * (2.1 - 2.0) / 2.0:+.2f}%"
    changed = rows["params=fp32,compute=nvfp4(sr_grad=false,weight_blocks=1x16),output=fp32"][1]
    assert changed == "no sr_grad, weight_blocks=1x16"
    assert rows["nvfp4-mixed"][1] == "(defaults)"
    assert "mxfp4" not in text  # no mxfp4 variant was run: no mxfp4 ablation


def test_every_changed_option_is_named():
    lines = ablation_section([run("nvfp4-mixed", 2.0), run("nvfp4-mixed(amax_reduce=true)", 2.0)])
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines if line.startswith("| ")}
    assert rows["nvfp4-mixed(amax_reduce=true)"][1] == "amax_reduce=True"


def test_no_ablation_without_a_4bit_variant():
    assert ablation_section([run("bf16-mixed", 2.0), run("nvfp4-mixed", 2.1)]) == []


@pytest.mark.parametrize("spec", ["nvfp4-mixed(rht=false,sr_grad=false)", "mxfp4-mixed/auto"])
def test_ablation_precisions_parse_as_compare_recipes(spec):
    assert Recipe.parse(spec).policy == spec.partition("/")[0]


def test_precisions_split_at_commas_outside_recipe_options():
    from mixprec.app.cli import split_precisions

    text = "bf16-mixed, nvfp4-mixed(rht=false,sr_grad=false),mxfp4-mixed,"
    assert split_precisions(text) == [
        "bf16-mixed",
        "nvfp4-mixed(rht=false,sr_grad=false)",
        "mxfp4-mixed",
    ]
