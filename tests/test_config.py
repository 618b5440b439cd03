"""Presets reproduce the published Llama 2 sizes exactly; the meta-device count agrees with the formula."""
import pytest

from llamactl.config import PRESETS, ModelConfig, dump_toml, preset
from llamactl.errors import LlamactlError
from llamactl.plan import count_on_meta

PUBLISHED = {
    "7b": 6_738_415_616,
    "13b": 13_015_864_320,
    "34b": 33_743_970_304,
    "70b": 68_976_648_192,
}


@pytest.mark.parametrize("size", list(PRESETS))
def test_meta_count_matches_formula(size):
    cfg = preset(size)
    assert count_on_meta(cfg) == cfg.num_params()


@pytest.mark.parametrize("size,n", PUBLISHED.items())
def test_published_sizes(size, n):
    assert preset(size).num_params() == n
    assert preset(size).head_dim == 128


def test_ffn_sizes():
    assert preset("7b").ffn_dim == 11008
    assert preset("13b").ffn_dim == 13824
    assert preset("34b").ffn_dim == 22016
    assert preset("70b").ffn_dim == 28672


def test_tiny_and_small():
    tiny, small = preset("tiny"), preset("small")
    assert tiny.kv_heads < tiny.n_heads  # GQA always exercised
    assert 55e6 < small.num_params() < 65e6


def test_unknown_size_and_bad_shapes():
    with pytest.raises(LlamactlError, match="unknown size"):
        preset("9b")
    with pytest.raises(LlamactlError, match="n_kv_heads"):
        ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=3)
    with pytest.raises(LlamactlError, match="unknown model config keys"):
        ModelConfig.from_dict({**preset("tiny").to_dict(), "bogus": 1})


def test_roundtrip_dict_and_toml():
    cfg = preset("70b")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    import tomllib

    assert tomllib.loads(dump_toml({"model": cfg}))["model"]["ffn_dim_multiplier"] == 1.3


def test_stage_sections_file_then_flags(tmp_path):
    """One resolver for every chat stage: a section the stage does not read is refused; flags given win over
    the file's [stage] section, flags not given (None) leave it."""
    from llamactl.config import load_sections, section_config
    from llamactl.stages.sft import SFTConfig

    bad = tmp_path / "bad.toml"
    bad.write_text("[sft]\nlr = 0.5\n[nope]\nx = 1\n")
    with pytest.raises(LlamactlError, match=r"unknown sections \['nope'\] .*use \[sft\], \[parallel\]"):
        load_sections(bad, ("sft", "parallel"))
    good = tmp_path / "good.toml"
    good.write_text("[sft]\nlr = 0.5\nepochs = 3\n")
    file = load_sections(good, ("sft", "parallel"))
    c = section_config(SFTConfig(), "sft", file, {"lr": 0.25, "epochs": None}, good)
    assert (c.lr, c.epochs, c.batch_size) == (0.25, 3, SFTConfig().batch_size)
    assert load_sections(None, ("sft",)) == {}
