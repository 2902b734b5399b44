"""Render the config reference (`docs/config_reference.md`) from the dataclass field docstrings.

A field's docstring is the string literal right below it (the GPT-NeoX habit), so the reference
cannot drift from the code: `tests/test_config.py` checks the committed file is current.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

from .config import RunConfig


def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> docstring of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _type_str(tp: Any) -> str:
    text = tp.__name__ if isinstance(tp, type) else str(tp)
    text = text.replace("typing.", "").replace("engram_pretrain.model.config.", "")
    return text.replace("|", r"\|")


def _section(cls: type, prefix: str, out: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    leaves, children = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        (children if dataclasses.is_dataclass(tp) else leaves).append((f, tp))
    if leaves:
        title = prefix.rstrip(".") or "(top level)"
        out += [f"## `{title}`", "", (inspect.getdoc(cls) or "").split("\n")[0], "",
                "| key | type | default | description |", "|---|---|---|---|"]
        for f, tp in leaves:
            default = repr(_default(f)).replace("|", r"\|")
            doc = docs.get(f.name, "").replace("|", r"\|")
            out.append(f"| `{prefix}{f.name}` | `{_type_str(tp)}` | `{default}` | {doc} |")
        out.append("")
    for f, tp in children:
        _section(tp, f"{prefix}{f.name}.", out)


def render_reference() -> str:
    """The whole config reference as Markdown."""
    out = ["# Configuration reference", "",
           "Generated from the dataclass docstrings by `engram-pretrain config-docs`; do not edit.",
           "Set any key in a YAML file or on the command line as a dotted override, e.g.",
           "`engram-pretrain params configs/tiny.yaml model.num_layers=6`.", ""]
    _section(RunConfig, "", out)
    return "\n".join(out).rstrip() + "\n"
