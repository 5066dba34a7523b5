"""Recipes and overrides: typos and wrong types stop with the key named; presets yield to explicit keys."""

from __future__ import annotations

import pytest

from lmforge.config import ConfigError, load_config


def test_overrides_and_types():
    cfg = load_config(overrides=["train.lr=1e-3", "model.n_layer=6", "train.compile=true",
                                 "data.sources=[a.txt, b.jsonl]", "train.resume=none"])
    assert cfg.train.lr == 1e-3 and cfg.model.n_layer == 6 and cfg.train.compile is True
    assert cfg.data.sources == ["a.txt", "b.jsonl"] and cfg.train.resume == "none"


@pytest.mark.parametrize("override,message", [
    ("model.n_layr=3", "unknown key 'model.n_layr' (did you mean 'model.n_layer'?)"),
    ("trian.lr=1", "unknown key 'trian' (did you mean 'train'?)"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("model.n_layer=2.5", "model.n_layer: expected an integer"),
    ("train.compile=maybe", "train.compile: expected true/false"),
    ("train.optimizer=adam", "train.optimizer: 'adam' is not one of adamw, muon (did you mean 'adamw'?)"),
    ("model", "must look like key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert message in str(e.value)


def test_recipe_errors_name_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  n_layer: 4\n  widht: 128\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'model.widht'"):
        load_config(recipe)
    recipe.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "missing.yaml")


def test_preset_then_explicit_keys_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: small\n  n_layer: 3\n")
    cfg = load_config(recipe, ["model.n_head=24"])  # a multiple of the preset's 12 key/value heads
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) == (3, 768, 24)
    gpt2 = load_config(overrides=["model.preset=gpt2-small"]).model
    assert (gpt2.norm, gpt2.pos, gpt2.mlp, gpt2.bias) == ("layernorm", "learned", "gelu", True)
    with pytest.raises(Exception, match="unknown model preset 'huge'"):
        load_config(overrides=["model.preset=huge"])


def test_a_remembered_layout_is_kept_fitted_or_replaced_whole(tmp_path, monkeypatch):
    """A run's lmforge.yaml remembers its parallel section. Restarted on as many processes with no parallel.*
    keys, the layout is kept; on a number it cannot fill, the default is taken; parallel.* keys given replace
    the remembered section whole rather than merging into it (pp 2 given to a pp 2 x dp_shard 2 run)."""
    from lmforge.cli import config_from_args

    run = tmp_path / "run"
    run.mkdir()
    (run / "lmforge.yaml").write_text("parallel:\n  pp: 2\n  dp_shard: 2\n  pp_schedule: dualpipev\n")
    monkeypatch.setenv("WORLD_SIZE", "4")
    kept = config_from_args([f"run_dir={run}"]).parallel
    assert (kept.pp, kept.dp_shard, kept.pp_schedule) == (2, 2, "dualpipev")
    monkeypatch.setenv("WORLD_SIZE", "2")
    fallback = config_from_args([f"run_dir={run}"]).parallel
    assert (fallback.pp, fallback.dp_shard, fallback.pp_schedule) == (1, -1, "1f1b")
    given = config_from_args([f"run_dir={run}", "parallel.pp=2"]).parallel
    assert (given.pp, given.dp_shard, given.pp_schedule) == (2, -1, "1f1b")


def test_a_preset_given_to_a_remembered_run_replaces_its_model(tmp_path, capsys):
    """The remembered lmforge.yaml holds every resolved model key, and explicit keys win over a preset: without
    replacing the section, `model.preset=small` on a tiny run kept the tiny model and said nothing."""
    from lmforge.cli import config_from_args
    from lmforge.model.presets import preset_values

    run = tmp_path / "run"
    run.mkdir()
    (run / "lmforge.yaml").write_text("model:\n  preset: tiny\n  n_layer: 2\n  n_embd: 64\n  n_head: 4\n"
                                      "train:\n  lr: 0.01\n")
    small = preset_values("small")
    cfg = config_from_args([f"run_dir={run}", "model.preset=small", "model.dropout=0.1"])
    assert (cfg.model.n_layer, cfg.model.n_embd) == (small["n_layer"], small["n_embd"]) != (2, 64)
    assert cfg.model.dropout == 0.1 and cfg.train.lr == 0.01  # keys given win; other sections stay remembered
    assert "remembers another model" in capsys.readouterr().err
    kept = config_from_args([f"run_dir={run}", "model.dropout=0.1"]).model
    assert (kept.n_layer, kept.n_embd) == (2, 64)
