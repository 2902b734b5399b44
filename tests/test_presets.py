"""The paper's systems as presets: meta-device parameter counts match the paper's totals within 3%."""

from __future__ import annotations

import pytest

from engram_pretrain.analysis.params import count_parameters
from engram_pretrain.cli import PRESET_DIR, main
from engram_pretrain.config import load_config

# Engram paper Table 1 (docs/model.md rule X2): (total, activated w/o embedding and head, Engram).
PAPER = {
    "moe-27b": (26.7e9, 3.8e9, 0.0),
    "engram-27b": (26.7e9, 3.8e9, 5.7e9),
    "engram-40b": (39.5e9, 3.8e9, 18.5e9),
}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_paper_systems_within_3_percent(preset: str) -> None:
    counts = count_parameters(load_config(PRESET_DIR / f"{preset}.yaml").model)
    total, activated, engram = PAPER[preset]
    assert abs(counts.total / total - 1) < 0.03
    assert abs(counts.activated / activated - 1) < 0.03
    if engram:
        assert abs(counts.engram / engram - 1) < 0.03
    else:
        assert counts.engram == 0


@pytest.mark.parametrize("base, engram", [("moe-3b", "moe-3b-engram-1.6b"), ("moe-27b", "engram-27b"),
                                          ("proxy-moe", "proxy-engram")])
def test_engram_variants_are_iso_parameter(base: str, engram: str) -> None:
    a = count_parameters(load_config(PRESET_DIR / f"{base}.yaml").model)
    b = count_parameters(load_config(PRESET_DIR / f"{engram}.yaml").model)
    assert abs(b.total / a.total - 1) < 0.01
    assert abs(b.activated / a.activated - 1) < 0.05
    assert b.engram > 0.1 * b.sparse


def test_params_cli_prints_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "engram-27b"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "engram" in out and "activated" in out
