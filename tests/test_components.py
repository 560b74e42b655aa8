"""Feature names are parsed in one place: every form the stages write round-trips."""

from __future__ import annotations

import pytest

from lorascope.components import Component, Name, parse_name


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("L3.q_proj", Name(3, "q_proj")),
        ("L12.down_proj.0", Name(12, "down_proj", 0)),
        ("L3.mlp.17", Name(3, "mlp", 17)),
        ("L3.q_proj+", Name(3, "q_proj", None, "+")),
        ("L0.mlp.5-", Name(0, "mlp", 5, "-")),
        ("sae.12", None),
        ("L3", None),
        ("L3.", None),
        ("Lx.q_proj", None),
        ("L3.q_proj.+", None),
    ],
)
def test_parse_name(name, parsed):
    assert parse_name(name) == parsed


def test_names_written_by_components_parse_back():
    for comp in (Component(4, "gate_proj", "model.layers.4.mlp.gate_proj", 1),
                 Component(4, "v_proj", "model.layers.4.self_attn.v_proj", 3),
                 Component(7, "mlp", "model.layers.7.mlp", 2)):  # fmt: skip
        for i, name in enumerate(comp.names()):
            got = parse_name(name)
            assert (got.layer, got.kind) == (comp.layer, comp.kind)
            assert got.index == (None if comp.kind != "mlp" and comp.width == 1 else i)
