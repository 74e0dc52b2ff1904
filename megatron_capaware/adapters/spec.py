"""Module specs that build MoE layers with capaware routing from the start.

Megatron describes a layer as a spec (``ModuleSpec`` in megatron-core 0.16,
``functools.partial`` of the module in 0.19); the MoE part carries an
``MoESubmodules(router=...)``. :func:`capaware_spec` walks any such spec and
makes every MoE layer a :class:`CapawareMoELayer` (which installs the capaware
router and dispatcher when it is built). Use it on the spec you already
build, e.g. ``capaware_spec(get_gpt_decoder_block_spec(config, use_te), cfg)``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Optional

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_capaware.adapters.guards import DeferredScoreCheck
from megatron_capaware.adapters.install import install_layers
from megatron_capaware.adapters.router import CapawareRouter
from megatron_capaware.config import CapawareConfig


class CapawareMoELayer(MoELayer):
    """``MoELayer`` built with the capaware router and dispatcher.

    Same parameters and state-dict keys as ``MoELayer``.
    """

    def __init__(self, *args: Any, capaware: CapawareConfig = None,
                 capaware_score_check: Optional[DeferredScoreCheck] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The one installer, per layer (ranks agree on this layer now; the model's layers share one
        # deferred score check, made by capaware_spec, expecting every layer built from the spec).
        if capaware_score_check is not None:
            capaware_score_check.expected += 1
        install_layers([self], capaware or CapawareConfig(), whole_model=False, score_check=capaware_score_check)

    @property
    def capaware_stats(self) -> Any:
        """The layer's ``LayerRoutingStats`` (None: stats off)."""
        return self.router.capaware_state.stats

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron numbers MoE layers after building them: keep the stats recorder's in step."""
        super().set_layer_number(layer_number)
        if self.capaware_stats is not None:
            self.capaware_stats.layer_number = int(layer_number)


def _router_builder(capaware: CapawareConfig) -> Any:
    return functools.partial(CapawareRouter, capaware=capaware)


def capaware_spec(spec: Any, capaware: CapawareConfig) -> Any:
    """A copy of ``spec`` in which every MoE layer routes with ``capaware``.

    Accepts a layer spec, a block spec (``TransformerBlockSubmodules``), or
    any nesting of ``ModuleSpec`` / ``functools.partial`` / dataclass
    submodules as megatron-core 0.16 to 0.19 produce them.
    """
    score_check = DeferredScoreCheck(None, 0)  # shared by every layer built from this spec
    return _walk(copy.copy(spec), capaware, score_check)


def _walk(node: Any, capaware: CapawareConfig, score_check: Any = None) -> Any:
    if isinstance(node, ModuleSpec):
        node = copy.copy(node)
        if node.module is MoELayer or node.module is CapawareMoELayer:
            node.module = CapawareMoELayer
            node.params = {**(node.params or {}), "capaware": capaware, "capaware_score_check": score_check}
        node.submodules = _walk(node.submodules, capaware, score_check)
        return node
    if isinstance(node, functools.partial):
        func = node.func
        keywords = {k: _walk(v, capaware, score_check) for k, v in node.keywords.items()}
        if func is MoELayer or func is CapawareMoELayer:
            func = CapawareMoELayer
            keywords["capaware"] = capaware
            keywords["capaware_score_check"] = score_check
        return functools.partial(func, *node.args, **keywords)
    if isinstance(node, MoESubmodules):
        return dataclasses.replace(node, router=_router_builder(capaware))
    if (
        dataclasses.is_dataclass(node)
        and not isinstance(node, type)
        and all(f.init for f in dataclasses.fields(node))
    ):
        changes = {f.name: _walk(getattr(node, f.name), capaware, score_check) for f in dataclasses.fields(node)}
        return dataclasses.replace(node, **changes)
    if isinstance(node, list):
        return [_walk(item, capaware, score_check) for item in node]
    if isinstance(node, tuple):
        return tuple(_walk(item, capaware, score_check) for item in node)
    return node
