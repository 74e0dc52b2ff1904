"""The package's structure: no import circle, router types named in one place, no global side effect on import."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

from megatron_capaware.config import CapawareConfig
from megatron_capaware.registry import ROUTER_TYPES, knobs_for

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_capaware"


def _modules() -> Dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> Dict[str, Set[str]]:
    """``{module: package modules it imports}``, every import statement (top level or inside a function).

    ``from pkg import sub`` names the submodule, not ``pkg`` (that is Python's
    parent-package import, not a dependency of the importing module on ``pkg``).
    """
    modules = _modules()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{alias.name}" for alias in node.names]
                targets = [t for t in subs if t in modules]
                if len(targets) < len(subs):
                    targets.append(base)
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_in_the_package() -> None:
    graph = import_graph()
    assert graph["megatron_capaware.adapters.install"], "the graph walker found no import at all"
    assert find_cycles(graph) == []


def test_cycle_finder_finds_a_planted_circle() -> None:
    graph = import_graph()
    graph["megatron_capaware.registry"] = graph["megatron_capaware.registry"] | {"megatron_capaware.config"}
    assert any("megatron_capaware.registry" in c and "megatron_capaware.config" in c for c in find_cycles(graph))


def router_name_literals(path: Path) -> List[str]:
    """String literals equal to a router type's name in one file.

    Left out: docstrings, ``__all__``, and record keys (``row["topk"]``, ``{"topk": k}``: a
    record's top-k count, not the router type).
    """
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            skip.add(id(node.slice))
        if isinstance(node, ast.Dict):
            skip.update(id(key) for key in node.keys if key is not None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            skip.update(id(n) for n in ast.walk(node.value))
    return [f"{path.name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in ROUTER_TYPES and id(node) not in skip]


def test_router_type_names_are_spelled_only_in_the_registry() -> None:
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path.name != "registry.py"
             for hit in router_name_literals(path)]
    assert found == [], "use megatron_capaware.registry (a capability, or its name constants):\n" + "\n".join(found)


def test_literal_finder_sees_a_literal(tmp_path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text('"""laser"""\n__all__ = ["topk"]\nk = row["topk"]\nif x == "capacity-drop":\n    pass\n')
    assert router_name_literals(planted) == ["planted.py:4: 'capacity-drop'"]


def _settings() -> List[CapawareConfig]:
    """Every registered type with defaults, and with each of its knobs away from the default."""
    changed = {"float": 0.75, "int": 2, "bool": True}
    out = []
    for name in ROUTER_TYPES:
        out.append(CapawareConfig(router_type=name))
        for knob in knobs_for(name):
            if knob.field in ("laser_calibration", "seed"):
                continue
            value = knob.choices[-1] if knob.choices else changed.get(knob.kind)
            if knob.field == "laser_pool":
                value = 4
            if knob.field == "capacity_unit" and value == "expert":
                value = "rank"
            out.append(CapawareConfig(router_type=name, **{knob.field: value}))
    return out


@pytest.mark.parametrize("cfg", _settings(), ids=lambda c: c.describe())
def test_config_round_trips_through_spec_and_flags(cfg: CapawareConfig) -> None:
    import argparse

    from megatron_capaware.megatron_lm.arguments import add_capaware_args, config_from_args
    from megatron_capaware.tools.router_specs import format_router_spec, megatron_flags, parse_router_spec

    assert parse_router_spec(format_router_spec(cfg))[0] == cfg, format_router_spec(cfg)
    parser = add_capaware_args(argparse.ArgumentParser())
    assert config_from_args(parser.parse_args(megatron_flags(cfg))) == cfg, megatron_flags(cfg)


def test_every_registered_type_has_a_flag_choice_and_a_label() -> None:
    import argparse

    from megatron_capaware.megatron_lm.arguments import add_capaware_args

    parser = add_capaware_args(argparse.ArgumentParser())
    choices = next(a.choices for a in parser._actions if "--moe-router-type" in a.option_strings)
    assert list(choices) == list(ROUTER_TYPES)
    for name in ROUTER_TYPES:
        assert CapawareConfig(router_type=name).describe().startswith(name)


_IMPORT_PROBE = """
import json, sys, torch
before = {k: id(v) for k, v in vars(torch.cuda).items()}
env = dict(__import__("os").environ)
import megatron_capaware, megatron_capaware.config, megatron_capaware.registry, megatron_capaware.policies
import megatron_capaware.placement, megatron_capaware.metrics, megatron_capaware.errors
changed = sorted(k for k, v in vars(torch.cuda).items() if before.get(k) != id(v))
print(json.dumps({"triton": "triton" in sys.modules, "cuda_changed": changed,
                  "env_changed": sorted(k for k in __import__("os").environ if env.get(k) != __import__("os").environ[k])}))
"""


def test_importing_the_library_changes_nothing_global() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, env=env,
                         cwd=str(PACKAGE.parent), timeout=300, check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {"triton": False, "cuda_changed": [], "env_changed": []}


def test_public_face() -> None:
    import megatron_capaware

    for name in megatron_capaware.__all__:
        assert getattr(megatron_capaware, name) is not None, name
