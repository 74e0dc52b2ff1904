"""Capaware-spec-built MoE layers keep their stats under Megatron's layer numbers.

Megatron-Core numbers an MoE layer after building it (``set_layer_number``);
the stats recorder made at build time must follow, or every layer's stats
land under layer 0 (megatron-core 0.16.1 and 0.19.2 alike).
"""

from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.cli_workers import spec_built_layer_numbers


def test_spec_built_layers_record_under_their_layer_numbers() -> None:
    (out,) = run_distributed(spec_built_layer_numbers, 1, {}, timeout_s=240)
    assert out["routers"] == [1, 2]
    assert out["stats"] == [1, 2]
