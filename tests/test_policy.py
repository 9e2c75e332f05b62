import collections
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mixprec import FORMATS, PRESETS, ModuleRule, Policy
from mixprec.formats import BF16, FP16, FP32

# -- parsing and the string round trip -----------------------------------------------------------


def test_the_issue_example_parses():
    p = Policy.parse("params=fp32,compute=bf16,output=fp32")
    assert (p.param, p.compute, p.output) == (FP32, BF16, FP32)
    assert p == PRESETS["bf16-mixed"]


def test_short_keys_and_aliases():
    assert Policy.parse("p=float32,c=half,o=float") == PRESETS["fp16-mixed"]
    assert Policy.parse("P = FP32 , C = BF16 , O = fp32") == PRESETS["bf16-mixed"]


def test_a_bare_format_sets_everything():
    p = Policy.parse("bf16")
    assert (p.param, p.compute, p.output, p.master, p.reduce) == (BF16,) * 5
    assert p == PRESETS["bf16-pure"]


def test_defaults_cascade():
    assert Policy.parse("compute=bf16") == Policy(param=FP32, compute=BF16, output=BF16)
    assert Policy.parse("params=bf16").compute == BF16
    assert Policy.parse("params=bf16").output == BF16
    assert Policy.parse("params=fp16").master == FP16
    assert Policy.parse("params=fp16").reduce == FP16
    assert Policy() == PRESETS["fp32"]


def test_constructor_accepts_names_and_dtypes():
    assert Policy(param="fp32", compute=torch.bfloat16, output="float32") == PRESETS["bf16-mixed"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip(name):
    p = Policy.parse(name)
    assert Policy.parse(str(p)) == p


def test_presets_mean_what_they_say():
    assert str(PRESETS["fp32"]) == "params=fp32,compute=fp32,output=fp32"
    assert str(PRESETS["fp16-mixed"]) == "params=fp32,compute=fp16,output=fp32"
    assert str(PRESETS["bf16-pure"]) == "params=bf16,compute=bf16,output=bf16"


def test_master_and_reduce_appear_only_when_they_differ():
    p = Policy.parse("p=bf16,master=fp32,r=fp32")
    assert str(p) == "params=bf16,compute=bf16,output=bf16,master=fp32,reduce=fp32"
    assert Policy.parse(str(p)) == p


def test_policies_are_frozen_and_hashable():
    p = PRESETS["bf16-mixed"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.compute = FP16  # type: ignore[misc]
    assert len({p, Policy.parse("bf16-mixed")}) == 1


_formats = st.sampled_from(sorted(FORMATS))
# fp8 as compute, output or master is refused (test_fp8_formats_outside_a_recipe_are_refused)
_unscaled = st.sampled_from(sorted(f for f in FORMATS if not f.startswith("fp8")))
_globs = st.text(alphabet="abcxyz_0123*?.", min_size=1, max_size=8).filter(
    lambda s: s.strip(" ") == s
)
_FP32_STORED = {"fp32", "tf32"}
_param_and_compute = st.tuples(_formats, st.none() | _unscaled).filter(
    # 16-bit (or fp8) params with fp32 compute are refused (test_wider_compute_is_refused).
    lambda pc: pc[1] not in _FP32_STORED or pc[0] in _FP32_STORED
)
_leaf_policies = st.builds(
    lambda param_compute, **rest: Policy(*param_compute, **rest),
    _param_and_compute,
    output=st.none() | _unscaled,
    master=st.none() | _unscaled,
    reduce=st.none() | _formats,
)
_rules = st.builds(
    ModuleRule, pattern=_globs, policy=_leaf_policies, kind=st.sampled_from(["name", "class"])
)


@given(_leaf_policies, st.lists(_rules, max_size=3))
def test_random_policies_round_trip(base, rules):
    policy = dataclasses.replace(base, rules=tuple(rules))
    text = str(policy)
    assert Policy.parse(text) == policy
    assert str(Policy.parse(text)) == text


@given(_leaf_policies)
def test_parse_accepts_a_policy_unchanged(policy):
    assert Policy.parse(policy) is policy


# -- per-module rules ----------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(4)
        self.mlp = nn.Linear(4, 4)


class MyNorm(nn.LayerNorm):
    pass


def test_rules_answer_which_policy_applies():
    p = Policy.parse("bf16-pure; class:LayerNorm -> fp32; lm_head -> fp32")
    assert p.for_module("blocks.3.ln1", nn.LayerNorm) == PRESETS["fp32"]
    assert p.for_module("blocks.3.ln1", MyNorm(4)) == PRESETS["fp32"]  # subclasses match
    assert p.for_module("lm_head", nn.Linear) == PRESETS["fp32"]
    assert p.for_module("model.lm_head", nn.Linear) == PRESETS["fp32"]  # dotted suffix
    assert p.for_module("blocks.3.mlp", nn.Linear) == PRESETS["bf16-pure"]
    assert p.for_module("blocks.3.mlp", nn.Linear).rules == ()


def test_name_globs_match_dotted_names_and_suffixes():
    p = Policy.parse("bf16; *norm* -> fp32; attn.proj -> fp16")
    assert p.for_module("blocks.0.norm1").param == FP32
    assert p.for_module("final_norm").param == FP32
    assert p.for_module("blocks.2.attn.proj").param == FP16
    assert p.for_module("blocks.2.mlp.proj").param == BF16
    assert p.for_module("blocks.2.attn").param == BF16


def test_first_matching_rule_wins():
    p = Policy.parse("bf16; ln* -> fp32; ln1 -> fp16")
    assert p.for_module("ln1").param == FP32


def test_class_rules_take_instances_classes_and_names():
    p = Policy.parse("bf16; class:*Norm* -> fp32")
    for module in (nn.BatchNorm2d(3), nn.GroupNorm, "RMSNorm", MyNorm):
        assert p.for_module("x", module).param == FP32
    assert p.for_module("x", nn.Linear(2, 2)).param == BF16
    assert p.for_module("norm").param == BF16  # a class rule never matches by name


def test_rules_walk_a_real_model():
    model = nn.ModuleDict({"block": Block(), "lm_head": nn.Linear(4, 4)})
    p = PRESETS["bf16-pure"].with_rules("class:LayerNorm -> fp32", "lm_head -> fp32")
    params = {name: p.for_module(name, m).param.name for name, m in model.named_modules()}
    assert params == {
        "": "bf16",
        "block": "bf16",
        "block.ln1": "fp32",
        "block.mlp": "bf16",
        "lm_head": "fp32",
    }


def test_rules_from_python():
    p = Policy(param="bf16", rules=[ModuleRule("*Norm", "fp32", kind="class")])
    assert p.rules[0].policy == PRESETS["fp32"]
    assert Policy.parse(str(p)) == p


# -- casting trees -------------------------------------------------------------------------------

Pair = collections.namedtuple("Pair", "a b")


def test_casts_floating_tensors_in_nested_containers_only():
    tree = {
        "x": torch.ones(2),
        "ids": torch.arange(3),
        "mask": torch.ones(2, dtype=torch.bool),
        "phase": torch.ones(2, dtype=torch.complex64),  # non-real: left alone, as autocast does
        "nested": [torch.ones(1, dtype=torch.float64), (torch.zeros(1), "text", 3.5)],
        "pair": Pair(torch.ones(1), None),
    }
    out = PRESETS["bf16-mixed"].cast_to_compute(tree)
    assert out["x"].dtype == torch.bfloat16
    assert out["ids"] is tree["ids"]
    assert out["mask"] is tree["mask"]
    assert out["phase"] is tree["phase"]
    assert out["nested"][0].dtype == torch.bfloat16
    assert isinstance(out["nested"][1], tuple) and out["nested"][1][0].dtype == torch.bfloat16
    assert out["nested"][1][1:] == ("text", 3.5)
    assert isinstance(out["pair"], Pair) and out["pair"].a.dtype == torch.bfloat16
    assert out["pair"].b is None
    # The values are torch's own cast.
    assert torch.equal(out["x"], tree["x"].to(torch.bfloat16))


def test_cast_to_param_and_output_use_their_fields():
    p = Policy.parse("p=fp16,c=bf16,o=fp32")
    x = torch.randn(3)
    assert p.cast_to_param(x).dtype == torch.float16
    assert p.cast_to_compute([x])[0].dtype == torch.bfloat16
    assert p.cast_to_output((x.half(),))[0].dtype == torch.float32


def test_tf32_casts_to_float32_storage():
    assert Policy.parse("tf32").cast_to_compute(torch.ones(1, dtype=torch.float16)).dtype == (
        torch.float32
    )


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (
            "bf17",
            ValueError,
            r"unknown precision 'bf17' in 'bf17'; valid presets: fp32, bf16-mixed",
        ),
        ("bf16-mxed", ValueError, r"unknown precision 'bf16-mxed'.*valid formats: fp32, tf32"),
        ("parms=bf16", ValueError, r"unknown policy key 'parms' in 'parms=bf16'; valid keys: "),
        ("params=bf17", ValueError, r"unknown number format 'bf17'.*key 'params'"),
        ("params=", ValueError, r"malformed item 'params=' in policy 'params='; write key=format"),
        ("params=fp32,,", ValueError, r"malformed item '' in policy"),
        ("p=fp32,params=bf16", ValueError, r"policy key 'params' is given twice"),
        ("", ValueError, r"empty policy in ''; write a preset \(fp32, bf16-mixed"),
        ("auto", ValueError, r"'auto' is not a fixed policy: it is chosen from the hardware"),
        ("bf16; *norm*", ValueError, r"malformed module rule '\*norm\*'.*'\*norm\* -> fp32'"),
        ("bf16; *norm* ->", ValueError, r"malformed module rule"),
        ("bf16; type:X -> fp32", ValueError, r"unknown module rule kind 'type'.*name, class"),
        ("bf16; a -> b -> fp32", ValueError, r"unknown precision 'b -> fp32'"),
        (3, TypeError, r"a policy is given as a string or a Policy, got int 3"),
    ],
)
def test_bad_strings(spec, error, message):
    with pytest.raises(error, match=message):
        Policy.parse(spec)


def test_bad_constructor_values():
    with pytest.raises(ValueError, match=r"Policy.compute: unknown number format 'bf17'"):
        Policy(compute="bf17")
    with pytest.raises(TypeError, match=r"Policy.param: expected a format name.*got int 16"):
        Policy(param=16)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"rules must be a tuple of ModuleRule, got ModuleRule"):
        Policy(rules=ModuleRule("x", "fp32"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"rules must hold ModuleRule objects, got 'x -> fp32'"):
        Policy(rules=("x -> fp32",))  # type: ignore[arg-type]


def test_bad_rules():
    with pytest.raises(ValueError, match=r"rules do not nest"):
        ModuleRule("x", Policy.parse("bf16; y -> fp32"))
    with pytest.raises(ValueError, match=r"needs a non-empty pattern, got ' '"):
        ModuleRule(" ", "fp32")
    with pytest.raises(ValueError, match=r"pattern 'a,b' may not contain"):
        ModuleRule("a,b", "fp32")
    with pytest.raises(ValueError, match=r"unknown module rule kind 'type'; valid kinds: name, cl"):
        ModuleRule("x", "fp32", kind="type")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"policy must be a Policy or a policy string, got int 3"):
        ModuleRule("x", 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spec",
    [
        "params=bf16,compute=fp32",
        "p=fp16,c=tf32",
        "params=bf16,compute=fp32,output=fp32",
        "fp32; lm_head -> params=bf16,compute=fp32",
    ],
)
def test_wider_compute_than_params_is_refused_at_parse_time(spec):
    with pytest.raises(
        ValueError,
        match=r"params=(bf16|fp16) with compute=(fp32|tf32) is not supported: .* "
        r"write 'params=fp32,compute=(bf16|fp16)'.*\(in policy '",
    ):
        Policy.parse(spec)


def test_wider_compute_than_params_is_refused_by_the_constructor():
    with pytest.raises(ValueError, match=r"params=bf16 with compute=fp32 is not supported"):
        Policy(param="bf16", compute="fp32")
    with pytest.raises(ValueError, match=r"params=fp16 with compute=fp32 is not supported"):
        ModuleRule("head", Policy(param=torch.float16, compute=torch.float32))


def test_why_wider_compute_is_refused_torch_will_not_mix_the_dtypes():
    # Without a 16-bit region nothing casts: torch itself refuses a bf16 weight on fp32 inputs.
    layer = nn.Linear(4, 4).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"dtype"):
        layer(torch.ones(2, 4))


def test_narrower_or_equal_compute_is_accepted():
    for spec in ("params=fp32,compute=bf16", "params=tf32,compute=fp32", "p=bf16,c=fp16"):
        assert Policy.parse(str(Policy.parse(spec))) == Policy.parse(spec)


def test_odd_argument_types_are_type_errors_naming_the_type():
    policy = Policy.parse("bf16; *norm* -> fp32")
    with pytest.raises(
        TypeError, match=r"for_module expects the module's dotted name as a str.*int 5"
    ):
        policy.for_module(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"for_module expects .* got NoneType None"):
        Policy().for_module(None)  # type: ignore[arg-type]  # no rules: checked all the same
    with pytest.raises(TypeError, match=r"module must be an nn.Module, a module class.*got int 5"):
        policy.for_module("blocks.0", 5)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"with_rules takes ModuleRule objects or rule strings .*int"
    ):
        policy.with_rules(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ModuleRule.matches expects .* got bytes b'x'"):
        policy.rules[0].matches(b"x")  # type: ignore[arg-type]


_HUGE = "x" * 1_000_000


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (_HUGE, "unknown precision"),
        (f"params={_HUGE}", "unknown number format"),
        (f"{_HUGE}=fp32", "unknown policy key"),
        (f"params=fp32,{_HUGE}", "malformed item"),
        (f"bf16; {_HUGE}", "malformed module rule"),
        (f"bf16; {_HUGE}:x -> fp32", "unknown module rule kind"),
        (f"bf16; a,{_HUGE} -> fp32", "may not contain"),
        (f"bf16; x -> {_HUGE}", "unknown precision"),
    ],
)
def test_errors_echo_a_bounded_part_of_a_huge_policy_string(spec, error):
    with pytest.raises(ValueError, match=error) as caught:
        Policy.parse(spec)
    message = str(caught.value)
    assert "x" * 90 in message  # the input is still shown...
    assert "x" * 201 not in message  # ...but never more than ~200 characters of it
    assert len(message) < 1500
    assert "characters in all" in message


def test_type_errors_echo_a_bounded_repr():
    with pytest.raises(TypeError, match=r"got list \[0, 0, .*characters in all") as caught:
        Policy.parse([0] * 100_000)  # type: ignore[arg-type]
    assert len(str(caught.value)) < 500
    with pytest.raises(TypeError, match=r"Policy.param: .*characters in all") as caught:
        Policy(param=[0] * 100_000)  # type: ignore[arg-type]
    assert len(str(caught.value)) < 500
