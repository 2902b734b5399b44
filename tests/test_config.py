"""Config loading: YAML + base chains + dotted overrides, errors that name the key, generated docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from engram_pretrain.cli import PRESET_DIR, main
from engram_pretrain.config import ConfigError, load_config, to_dict
from engram_pretrain.config_docs import field_docs, render_reference
from engram_pretrain.model.config import EngramConfig

REPO = Path(__file__).resolve().parents[1]


def test_defaults_validate() -> None:
    cfg = load_config()
    assert cfg.model.num_layers == 4 and cfg.optimizer.name == "adamw"


def test_yaml_base_chain_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("name: a\nmodel:\n  hidden_size: 32\n  num_layers: 3\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: b\nmodel:\n  num_layers: 5\n")
    cfg = load_config(tmp_path / "child.yaml", ["model.moe.top_k=1", "optimizer.betas=[0.8, 0.9]",
                                                "data.weights=null"])
    assert (cfg.name, cfg.model.hidden_size, cfg.model.num_layers) == ("b", 32, 5)
    assert cfg.model.moe.top_k == 1 and cfg.optimizer.betas == [0.8, 0.9]


@pytest.mark.parametrize("override, key", [
    ("model.num_layer=4", "model.num_layer: unknown key"),
    ("model.moe.topk=2", "model.moe.topk: unknown key"),
    ("bogus=1", "bogus: unknown key"),
    ("model.num_layers=four", "model.num_layers: expected an integer"),
    ("model.engram.gating=1", "model.engram.gating: expected true/false"),
    ("optimizer.name=sgd", "optimizer.name: 'sgd' is not one of"),
    ("model.moe.top_k=9", "model.moe.top_k: 9 must be in [1, num_routed_experts=8]"),
    ("model.engram.layers=[7]", "model.engram.layers[0]: layer index 7 out of range"),
    ("model.engram.layers=[1]", None),
    ("model.engram.d_mem=60", "model.engram.d_mem: 60 is not divisible by (max_ngram - 1) * num_heads = 16"),
    ("model.attention.num_kv_heads=3", "model.attention.num_kv_heads: 3 must divide num_heads=4"),
    ("data.seq_len=100000", "data.seq_len: 100000 exceeds model.max_seq_len"),
    ("parallel.ep_size=9", "parallel.ep_size: 9 exceeds model.moe.num_routed_experts=8"),
    ("schedule.warmup_steps=1000", "schedule.warmup_steps"),
])
def test_errors_name_the_key(override: str, key: str | None) -> None:
    if key is None:
        assert load_config(None, [override]).model.engram.layers == [1]
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_missing_file_and_bad_override() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["model.num_layers"])


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_presets_load(preset: str) -> None:
    cfg = load_config(PRESET_DIR / f"{preset}.yaml")
    assert cfg.name == preset
    assert to_dict(cfg)["model"]["num_layers"] == cfg.model.num_layers


def test_field_docs_cover_every_field() -> None:
    import dataclasses

    docs = field_docs(EngramConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(EngramConfig)}
    assert "sqrt" in docs["signed_sqrt_gate"]


def test_config_reference_is_current() -> None:
    committed = (REPO / "docs" / "config_reference.md").read_text()
    assert committed == render_reference(), "run `make docs` to regenerate docs/config_reference.md"


def test_cli_reports_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "tiny", "model.moe.top_k=99"]) == 2
    assert "model.moe.top_k" in capsys.readouterr().err
    assert main(["params", "no-such-preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_cuda_ops_are_refused_for_host_tables() -> None:
    with pytest.raises(ConfigError, match="parallel.kernel_backend: cuda"):
        load_config(None, ["parallel.host_tables=true", "parallel.kernel_backend=cuda"])
    cfg = load_config(None, ["parallel.host_tables=true", "parallel.kernel_backend=cpp"])
    assert cfg.parallel.host_tables
