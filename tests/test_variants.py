import argparse

import pytest

from attention_drift import cli
from attention_drift.runs.variants import (SADR_VARIANTS, SADRSpec, Variant, VariantError, paper_variants, sadr_variant,
                                      split_layers)


def test_layer_halves_follow_depth_and_edit_layer():
    assert split_layers(5, 30) == {"lower": tuple(range(5, 18)), "upper": tuple(range(18, 30))}  # SmolLM2, ROME at 5
    assert split_layers(3, 18) == {"lower": tuple(range(3, 11)), "upper": tuple(range(11, 18))}  # Gemma-3-270m


def test_paper_table_is_built_from_the_editor_registry():
    from attention_drift.editing import EDITORS

    table = paper_variants()
    for method in EDITORS:
        assert table[method] == Variant(method, method)
        assert table[f"{method}-sadr"] == Variant(f"{method}-sadr", method, SADRSpec())
        assert table[f"{method}-sadr-plus"] == Variant(f"{method}-sadr-plus", method, sadr_variant("plus", method))
    assert table["rome-sadr-upper"].sadr.layers == "upper"
    assert {m for m in EDITORS if f"{m}-sadr-cross" in table} == {"rome", "memit", "pmet"}


def _args(*argv):
    parser = argparse.ArgumentParser()
    cli.add_variant_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_python_and_table_build_the_same_value():
    assert cli.variant_from_args(_args("--method", "rome", "--sadr", "--sadr-weight", "1")) == \
        Variant("rome-sadr", "rome", SADRSpec(weight=1.0))
    assert cli.variant_from_args(_args("--variant", "rome-sadr-w1")) == paper_variants()["rome-sadr-w1"]
    assert cli.variant_from_args(_args("--sadr-layers", "5-7", "--sadr", "--method", "memit")).sadr.layers == (5, 6, 7)


@pytest.mark.parametrize("kwargs, needle", [
    ({"method": "fine-tune"}, "unknown editing method"),
    ({"method": "none", "sadr": SADRSpec()}, "needs an editing method"),
    ({"method": "rome", "stats_samples": 0}, "stats_samples must be >= 1"),
])
def test_bad_variants_say_what_to_change(kwargs, needle):
    with pytest.raises(VariantError, match=needle):
        Variant("x", **kwargs)


def test_resolve_uses_the_model_preset_and_published_sadr(tiny_llama):
    from attention_drift.editing import ROMEConfig
    from attention_drift.editing.sadr import PUBLISHED

    config, sadr = Variant("v", "rome", SADRSpec(layers="lower"), stats_samples=7).resolve(tiny_llama)
    assert config == ROMEConfig.for_model(tiny_llama).__class__(**{**ROMEConfig.for_model(tiny_llama).__dict__,
                                                                  "stats": config.stats})
    assert config.stats.n_samples == 7
    assert (sadr.weight, sadr.steps) == PUBLISHED["rome"]
    assert sadr.layers == split_layers(config.layer, tiny_llama.cfg.n_layers)["lower"]
    with pytest.raises(VariantError, match="no layers in that half"):
        Variant("v", "rome", SADRSpec(layers="upper")).resolve(tiny_llama)


def test_sadr_variant_flag_picks_a_named_variant_and_other_flags_override_it():
    plus = cli.variant_from_args(_args("--method", "rome", "--sadr", "--sadr-variant", "plus"))
    assert plus == paper_variants()["rome-sadr-plus"] and plus.sadr.output_weight > 0 and plus.sadr.distract
    assert cli.variant_from_args(_args("--method", "pmet", "--sadr", "--sadr-variant", "published")) == \
        paper_variants()["pmet-sadr"]
    heavier = cli.variant_from_args(_args("--method", "rome", "--sadr", "--sadr-variant", "plus", "--sadr-steps", "7"))
    assert heavier.name == "rome-sadr-plus"
    assert heavier.sadr == sadr_variant("plus", "rome", steps=7)
    assert set(SADR_VARIANTS) >= {"published", "plus", "cross"}


def test_cross_is_plus_with_the_mentions_nulled_and_is_the_tuning_halfs_k8():
    from attention_drift.editing.sadr import NULL_MENTIONS
    from attention_drift.runs.variants import CROSS_CANDIDATES

    cross = cli.variant_from_args(_args("--method", "memit", "--sadr", "--sadr-variant", "cross"))
    assert cross.name == "memit-sadr-cross" and cross.sadr.key_nulls == NULL_MENTIONS
    assert cross.sadr == sadr_variant("plus", "memit", key_nulls=NULL_MENTIONS)
    assert sadr_variant("cross", "rome") == CROSS_CANDIDATES["k8"]


@pytest.mark.parametrize("argv, needle", [
    (("--method", "rome", "--sadr-variant", "plus"), "--sadr-variant needs --sadr"),
    (("--method", "rome", "--sadr", "--sadr-variant", "best"), "unknown SADR variant 'best'"),
    (("--method", "none", "--sadr"), "needs an editing method"),
    (("--variant", "rome-sadr", "--sadr-variant", "plus"), "names a whole variant"),
    (("--method", "alphaedit", "--sadr", "--sadr-variant", "cross"), "defined for rome, memit, pmet, not 'alphaedit'"),
])
def test_bad_sadr_variant_flags_say_what_to_change(argv, needle):
    from attention_drift.core.errors import AttentionDriftError

    with pytest.raises(AttentionDriftError, match=needle):
        cli.variant_from_args(_args(*argv))
