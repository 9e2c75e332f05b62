"""The policy's ``state`` field: the format of the optimizer's states (issue 21 items 1, 5)."""

import pytest
from torch import nn

from mixprec import PRESETS, Policy
from mixprec.formats import BF16, STATE_FORMATS
from mixprec.optim.quantized_states import STATE_FORMATS as STORAGE_FORMATS
from mixprec.optim.quantized_states import storage_named


def test_state_defaults_to_fp32_and_existing_strings_are_unchanged():
    for name, preset in PRESETS.items():
        if name != "bf16-lean":
            assert preset.state == "fp32"
            assert "state" not in str(preset)
    assert str(PRESETS["bf16-pure"]) == "params=bf16,compute=bf16,output=bf16"


@pytest.mark.parametrize("state", STATE_FORMATS)
def test_state_round_trips_by_long_and_short_key(state):
    long = Policy.parse(f"params=bf16,state={state}")
    short = Policy.parse(f"p=bf16,s={state.upper()}")
    assert long == short and long.state == state
    assert Policy.parse(str(long)) == long
    assert ("state=" in str(long)) == (state != "fp32")


def test_every_policy_state_is_a_storage_the_wrappers_build():
    assert set(STATE_FORMATS) == set(STORAGE_FORMATS)
    for state in STATE_FORMATS:
        assert storage_named(state).name in (state, "float16", "bfloat16")


def test_fp8_e4m3_is_fp8():
    assert Policy.parse("p=bf16,s=fp8_e4m3").state == "fp8"


def test_bf16_lean_is_bf16_pure_with_int8_states():
    lean = PRESETS["bf16-lean"]
    assert lean == Policy.parse("bf16-lean") == Policy(BF16, BF16, BF16, state="int8")
    assert str(lean) == "params=bf16,compute=bf16,output=bf16,state=int8"
    assert Policy.parse(str(lean)) == lean


def test_a_rule_setting_only_state_keeps_the_rest_of_the_base():
    p = Policy.parse("bf16-lean; class:Embedding -> state=fp32")
    emb = p.for_module("tok", nn.Embedding)
    assert (emb.param, emb.compute, emb.state) == (BF16, BF16, "fp32")
    assert p.for_module("fc", nn.Linear).state == "int8"
    assert Policy.parse(str(p)) == p
    via_python = Policy.parse("bf16-lean").with_rules("class:Embedding -> s=fp32")
    assert via_python == p


def test_a_whole_rule_policy_has_its_own_state():
    p = Policy.parse("bf16-lean; lm_head -> bf16-mixed")
    assert p.for_module("lm_head").state == "fp32"  # a whole policy: fields cascade from defaults
    assert Policy.parse("bf16-lean; lm_head -> bf16-lean").for_module("lm_head").state == "int8"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("p=bf16,state=tf32", r"state='tf32': tf32 is a matmul mode.*'fp32', 'bf16'"),
        ("p=bf16,s=fp8_e5m2", r"state='fp8_e5m2': e5m2 keeps 2 fraction bits.*'int8'"),
        ("p=bf16,s=int4", r"state='int4': not an optimizer-state format.*'fp8', 'int8'"),
        ("bf16; *norm* -> state=nf4", r"state='nf4'"),
    ],
)
def test_bad_state_formats_name_the_value_and_the_choices(spec, message):
    with pytest.raises(ValueError, match=message):
        Policy.parse(spec)


def test_bad_state_type():
    with pytest.raises(TypeError, match=r"optimizer-state format is a name.*got int 8"):
        Policy(state=8)  # type: ignore[arg-type]
