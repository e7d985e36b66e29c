"""ShiraConfig validation and target discovery: bad input fails early, naming the field."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import shira_fx
from shira_fx.targets import find_targets
from tests import tiny_models

BAD_FIELDS = [
    ({"density": 0.0}, "density"),
    ({"density": 1.5}, "density"),
    ({"density": "0.1"}, "density"),
    ({"density": True}, "density"),
    ({"r": 0}, "r"),
    ({"r": 2.5}, "r"),
    ({"r": 4, "density": 0.1}, "density or r"),
    ({"mask": "topk"}, "mask"),
    ({"seed": "1"}, "seed"),
    ({"values_dtype": "int8"}, "values_dtype"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": 7}, "target_modules"),
    ({"target_modules": "q_proj("}, "target_modules"),
    ({"exclude_modules": "lm_head"}, "exclude_modules"),
]


@pytest.mark.parametrize("kwargs,field", BAD_FIELDS)
def test_invalid_fields_fail_at_construction_naming_the_field(kwargs, field):
    with pytest.raises(shira_fx.ShiraConfigError, match=field):
        shira_fx.ShiraConfig(**kwargs)


@given(out=st.integers(1, 5000), inp=st.integers(1, 5000), density=st.floats(1e-4, 1.0))
def test_density_budget_is_the_rounded_fraction_within_bounds(out, inp, density):
    k = shira_fx.ShiraConfig(density=density).budget(out, inp)
    assert 1 <= k <= out * inp
    assert k == max(1, min(out * inp, round(density * out * inp)))


@given(out=st.integers(1, 5000), inp=st.integers(1, 5000), r=st.integers(1, 64))
def test_r_budget_matches_peft_count(out, inp, r):
    assert shira_fx.ShiraConfig(r=r).budget(out, inp) == min(out * inp, r * (out + inp))


def test_config_round_trips_through_json_dict():
    cfg = shira_fx.ShiraConfig(target_modules=["q_proj"], r=8, mask="wm", seed=4,
                               values_dtype=torch.float64)
    assert cfg.values_dtype == "float64"
    assert shira_fx.ShiraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(shira_fx.ShiraConfigError, match="unknown fields"):
        shira_fx.ShiraConfig.from_dict({**cfg.to_dict(), "alpha": 2})


@pytest.mark.parametrize("kind,head", [("llama", "lm_head"), ("gpt2", "lm_head"),
                                       ("bert", "classifier"), ("vit", "classifier")])
def test_default_targets_every_linear_but_the_output_head(kind, head):
    model = tiny_models.build(kind)
    names = [t.name for t in find_targets(model, shira_fx.ShiraConfig())]
    assert head not in names and names
    if kind == "gpt2":
        assert all(t.transposed for t in find_targets(model, shira_fx.ShiraConfig()))
        assert "transformer.h.0.attn.c_attn" in names


def test_list_names_match_dotted_suffixes_and_regex_matches_full_names():
    model = tiny_models.build("llama")
    by_list = find_targets(model, shira_fx.ShiraConfig(target_modules=["q_proj", "down_proj"]))
    by_regex = find_targets(model, shira_fx.ShiraConfig(target_modules=r".*\.(q_proj|down_proj)"))
    assert [t.name for t in by_list] == [t.name for t in by_regex]
    assert len(by_list) == 4


def test_unknown_or_non_linear_targets_are_errors_that_name_them():
    model = tiny_models.build("llama")
    with pytest.raises(shira_fx.ShiraConfigError, match="qproj"):
        find_targets(model, shira_fx.ShiraConfig(target_modules=["q_proj", "qproj"]))
    with pytest.raises(shira_fx.ShiraConfigError, match="LlamaAttention"):
        find_targets(model, shira_fx.ShiraConfig(target_modules=["self_attn"]))
    with pytest.raises(shira_fx.ShiraConfigError, match="matches no linear layer"):
        find_targets(model, shira_fx.ShiraConfig(target_modules=r"nothing\..*"))


def test_failed_prepare_leaves_the_model_untouched():
    model = tiny_models.build("mlp")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(shira_fx.ShiraConfigError):
        shira_fx.prepare(model, shira_fx.ShiraConfig(target_modules=["nope"]))
    with pytest.raises(shira_fx.ShiraConfigError, match="grad"):
        shira_fx.prepare(model, shira_fx.ShiraConfig(mask="grad"), progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_preparing_a_prepared_model_twice_is_refused():
    model = tiny_models.build("mlp")
    shira_fx.prepare(model, shira_fx.ShiraConfig(), progress=False)
    with pytest.raises(shira_fx.ShiraConfigError, match="already carries"):
        shira_fx.prepare(model, shira_fx.ShiraConfig(), progress=False)
