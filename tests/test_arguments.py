"""The --moe-router-type / --capaware-* flags: values, defaults, errors at parse time.

The first part uses a plain argparse parser (runs on every install); the
``megatron_training`` part parses with Megatron's own parser from
``megatron.training`` (megatron-core 0.19.2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

import pytest

from megatron_capaware.megatron_lm.arguments import (
    DEFAULTS,
    add_capaware_args,
    config_from_args,
    resolve_args,
    with_capaware_args,
)
from megatron_capaware.config import CapawareConfig, CapawareConfigError
from tests.helpers.megatron_training_support import needs_megatron_training


def parser() -> argparse.ArgumentParser:
    return add_capaware_args(argparse.ArgumentParser(prog="prog"))


def parse(argv: List[str]) -> argparse.Namespace:
    return parser().parse_args(argv)


def parse_error(argv: List[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def write_calibration(path: Path, layers=(1, 2), experts=8, topk=2) -> str:
    data = {
        "format": "capaware-laser-calibration/1",
        "model": {"moe_layer_numbers": list(layers), "num_moe_experts": experts, "moe_router_topk": topk},
        "rule": {}, "statistics": {},
        "layers": {str(l): {"eps_high": 0.5 + 0.1 * i, "t_fix": 0.4, "pool": 4} for i, l in enumerate(layers)},
    }
    path.write_text(json.dumps(data))
    return str(path)


# --------------------------------------------------------------------------- defaults


def test_defaults_are_vanilla_topk_and_the_documented_knobs() -> None:
    args = parse([])
    assert args.moe_router_type == "topk"
    assert args.capaware_stats_output is None
    for dest, value in DEFAULTS.items():
        assert getattr(args, dest) == value, dest
    cfg = config_from_args(args)
    assert cfg == CapawareConfig()
    # A namespace nobody resolved (e.g. built by hand) gives the same config.
    assert config_from_args(argparse.Namespace(moe_router_type="topk")) == CapawareConfig()


def test_help_states_units_and_defaults(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrap inside a hyphenated flag name
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in (
        "C = ceil(gamma x T x k / E)", "Default: 1.25", "Default: topk", "(a ratio in (0, 1])",
        "Default: 2 x --moe-router-topk", "Default: follows Megatron's --moe-token-drop-policy",
        "as JSON to PATH", "Default: 0.6", "Default: global", "Default: 8",
    ):
        assert needle in text, needle


# --------------------------------------------------------------------------- every flag


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--moe-router-type", "capacity-drop", "--capaware-gamma", "1.5", "--capaware-drop-policy",
          "random", "--capaware-seed", "7", "--capaware-renormalize", "--capaware-scope", "local"],
         dict(router_type="capacity-drop", gamma=1.5, drop_policy="random", seed=7, renormalize=True,
              scope="local")),
        (["--moe-router-type", "capacity-reroute", "--capaware-gamma", "1.0", "--capaware-reroute-rounds",
          "3", "--capaware-reroute-policy", "load", "--capaware-reroute-min-ratio", "0.25",
          "--capaware-drop-policy", "position"],
         dict(router_type="capacity-reroute", gamma=1.0, reroute_rounds=3, reroute_policy="load",
              reroute_min_ratio=0.25, drop_policy="position")),
        (["--moe-router-type", "expanded-drop", "--capaware-gamma", "2"],
         dict(router_type="expanded-drop", gamma=2.0)),
        (["--moe-router-type", "laser", "--capaware-laser-eps-high", "0.8", "--capaware-laser-t-fix", "0.3",
          "--capaware-laser-pool", "6", "--capaware-laser-waves", "4", "--capaware-laser-rounds", "0",
          "--capaware-renormalize"],
         dict(router_type="laser", laser_eps_high=0.8, laser_t_fix=0.3, laser_pool=6, laser_waves=4,
              laser_rounds=0, renormalize=True)),
        (["--moe-router-type", "laser", "--capaware-laser-load", "rank"],
         dict(router_type="laser", laser_load="rank")),
        (["--capaware-stats-output", "out/stats.json"], dict(router_type="topk")),
        (["--moe-router-type", "capacity-reroute", "--capaware-reroute-rounds", "0"],
         dict(router_type="capacity-reroute", reroute_rounds=0, gamma=1.25)),
        (["--moe-router-type", "capacity-reroute", "--capaware-capacity-unit", "rank", "--capaware-gamma", "1.05"],
         dict(router_type="capacity-reroute", capacity_unit="rank", gamma=1.05)),
        (["--moe-router-type", "decode-pack", "--capaware-decode-floor", "2", "--capaware-decode-pool", "16",
          "--capaware-decode-t-fix", "0.1", "--capaware-decode-slack", "1", "--capaware-renormalize"],
         dict(router_type="decode-pack", decode_floor=2, decode_pool=16, decode_t_fix=0.1, decode_slack=1,
              decode_rank_aware=True, renormalize=True)),
        (["--moe-router-type", "decode-pack", "--capaware-decode-oea"],
         dict(router_type="decode-pack", decode_floor=None, decode_rank_aware=False)),
    ],
)
def test_every_flag_reaches_the_config(argv, expected) -> None:
    args = parse(argv)
    cfg = config_from_args(args)
    for field, value in expected.items():
        assert getattr(cfg, field) == value, field
    if "--capaware-stats-output" in argv:
        assert args.capaware_stats_output == "out/stats.json"


def test_calibration_file_sets_per_layer_parameters(tmp_path) -> None:
    path = write_calibration(tmp_path / "cal.json")
    cfg = config_from_args(parse(["--moe-router-type", "laser", "--capaware-laser-calibration", path]))
    assert cfg.laser_calibration == path
    assert sorted(cfg.layer_params) == [1, 2]
    assert cfg.layer_params[2].eps_high == pytest.approx(0.6)


def test_gamma_inf_is_accepted_as_no_capacity() -> None:
    assert config_from_args(parse(["--moe-router-type", "capacity-drop", "--capaware-gamma", "inf"])).gamma == float("inf")


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--moe-router-type", "sinkhorn"], "argument --moe-router-type: invalid choice: 'sinkhorn'"),
        (["--moe-router-type", "capacity-drop", "--capaware-gamma", "0"], "argument --capaware-gamma: '0' must be > 0"),
        (["--moe-router-type", "capacity-drop", "--capaware-gamma", "nan"], "argument --capaware-gamma: 'nan' must be > 0"),
        (["--moe-router-type", "capacity-drop", "--capaware-gamma", "abc"], "'abc' is not a number"),
        (["--moe-router-type", "capacity-drop", "--capaware-gamma", "5e6"], "absurdly large"),
        (["--moe-router-type", "capacity-drop", "--capaware-drop-policy", "probs"], "argument --capaware-drop-policy: invalid choice"),
        (["--moe-router-type", "laser", "--capaware-scope", "world"], "argument --capaware-scope: invalid choice"),
        (["--moe-router-type", "capacity-reroute", "--capaware-reroute-rounds", "-1"], "must be an integer >= 0"),
        (["--moe-router-type", "capacity-reroute", "--capaware-reroute-rounds", "1.5"], "'1.5' is not an integer"),
        (["--moe-router-type", "capacity-reroute", "--capaware-reroute-policy", "random"], "argument --capaware-reroute-policy: invalid choice"),
        (["--moe-router-type", "capacity-reroute", "--capaware-reroute-min-ratio", "-0.5"], "must be a finite number >= 0"),
        (["--moe-router-type", "laser", "--capaware-laser-eps-high", "1.5"], "eps_high=1.5 must be in [0, 1]"),
        (["--moe-router-type", "laser", "--capaware-laser-t-fix", "0"], "argument --capaware-laser-t-fix: '0' must be in (0, 1]"),
        (["--moe-router-type", "laser", "--capaware-laser-t-fix", "1.5"], "must be in (0, 1]"),
        (["--moe-router-type", "laser", "--capaware-laser-pool", "0"], "must be an integer >= 1"),
        (["--moe-router-type", "laser", "--capaware-laser-waves", "0"], "must be an integer >= 1"),
        (["--moe-router-type", "laser", "--capaware-laser-rounds", "-2"], "must be an integer >= 0"),
        (["--moe-router-type", "laser", "--capaware-laser-calibration", "/nonexistent/cal.json"], "file '/nonexistent/cal.json' does not exist"),
        (["--moe-router-type", "capacity-drop", "--capaware-drop-policy", "random", "--capaware-seed", "-3"], "must be an integer >= 0"),
    ],
)
def test_bad_values_fail_at_parse_time(argv, message, capsys) -> None:
    err = parse_error(argv, capsys)
    assert message in err, err


def test_malformed_calibration_file_fails_at_parse_time(tmp_path, capsys) -> None:
    path = tmp_path / "cal.json"
    path.write_text("{not json")
    err = parse_error(["--moe-router-type", "laser", "--capaware-laser-calibration", str(path)], capsys)
    assert "is not valid JSON" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--capaware-gamma", "1.0"], "--capaware-gamma has no effect with --moe-router-type topk"),
        (["--moe-router-type", "laser", "--capaware-gamma", "1.0"], "--capaware-gamma has no effect with --moe-router-type laser"),
        (["--moe-router-type", "capacity-drop", "--capaware-laser-pool", "4"], "--capaware-laser-pool has no effect with --moe-router-type capacity-drop"),
        (["--moe-router-type", "capacity-drop", "--capaware-reroute-rounds", "2"], "applies to --moe-router-type capacity-reroute"),
        (["--moe-router-type", "expanded-drop", "--capaware-drop-policy", "position"], "--capaware-drop-policy has no effect with --moe-router-type expanded-drop"),
        (["--capaware-scope", "local"], "--capaware-scope has no effect with --moe-router-type topk"),
        (["--moe-router-type", "expanded-drop", "--capaware-capacity-unit", "rank"],
         "--capaware-capacity-unit has no effect with --moe-router-type expanded-drop"),
        (["--moe-router-type", "capacity-drop", "--capaware-seed", "3"], "--capaware-seed only seeds --capaware-drop-policy random"),
        (["--moe-router-type", "laser", "--capaware-decode-floor", "2"],
         "--capaware-decode-floor has no effect with --moe-router-type laser"),
        (["--moe-router-type", "decode-pack", "--capaware-gamma", "1.0"],
         "--capaware-gamma has no effect with --moe-router-type decode-pack"),
    ],
)
def test_knobs_of_another_router_are_refused(argv, message, capsys) -> None:
    assert message in parse_error(argv, capsys)


def test_calibration_and_explicit_laser_knobs_contradict(tmp_path, capsys) -> None:
    path = write_calibration(tmp_path / "cal.json")
    err = parse_error(["--moe-router-type", "laser", "--capaware-laser-calibration", path,
                       "--capaware-laser-eps-high", "0.5"], capsys)
    assert "--capaware-laser-calibration sets eps_high, t_fix and pool for every layer" in err
    assert "--capaware-laser-eps-high" in err


# --------------------------------------------------------------------------- Megatron flags (namespace level)


def megatron_namespace(**values) -> argparse.Namespace:
    """What Megatron's parser would hold, plus our flags (unresolved)."""
    base = dict(
        moe_expert_capacity_factor=None, moe_token_drop_policy="probs", moe_pad_expert_input_to_capacity=False,
        moe_router_load_balancing_type=["aux_loss"], moe_token_dispatcher_type="alltoall",
        context_parallel_size=1, tensor_model_parallel_size=1, sequence_parallel=False,
        moe_router_num_groups=None, moe_router_group_topk=None, moe_router_enable_expert_bias=False,
        num_experts=8, moe_router_topk=2, moe_router_score_function="softmax", transformer_impl="local",
        capaware_stats_output=None,
    )
    base.update({d: None for d in DEFAULTS})
    base.update(values)
    return argparse.Namespace(**base)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(moe_router_type="capacity-drop", moe_expert_capacity_factor=1.0),
         "cannot be combined with Megatron's --moe-expert-capacity-factor 1"),
        (dict(moe_router_type="laser", moe_expert_capacity_factor=2.0), "Use --capaware-gamma"),
        (dict(moe_router_type="capacity-drop", moe_pad_expert_input_to_capacity=True),
         "--moe-pad-expert-input-to-capacity"),
        (dict(moe_router_type="capacity-drop", moe_token_drop_policy="position", capaware_drop_policy="score"),
         "--moe-token-drop-policy position and --capaware-drop-policy score contradict"),
        (dict(moe_router_type="laser", moe_token_drop_policy="position"),
         "--moe-token-drop-policy position has no effect with --moe-router-type laser"),
        (dict(moe_router_type="capacity-reroute", moe_router_load_balancing_type=["aux_loss", "sinkhorn"]),
         "--moe-router-load-balancing-type sinkhorn"),
        (dict(moe_router_type="capacity-drop", moe_token_dispatcher_type="flex"),
         "supports --moe-token-dispatcher-type alltoall and allgather"),
        (dict(moe_router_type="capacity-drop", context_parallel_size=2), "context parallelism"),
        (dict(moe_router_type="expanded-drop", tensor_model_parallel_size=2), "needs --sequence-parallel"),
        (dict(moe_router_type="laser", moe_router_num_groups=4, moe_router_group_topk=2), "group-limited routing"),
        (dict(moe_router_type="laser", moe_router_enable_expert_bias=True), "--moe-router-enable-expert-bias"),
        (dict(moe_router_type="laser", capaware_laser_pool=2, moe_router_topk=4), "pool=2 is smaller than top-k=4"),
        (dict(moe_router_type="laser", transformer_impl="inference_optimized"), "inference_optimized"),
    ],
)
def test_contradictions_with_megatron_flags(values, message) -> None:
    with pytest.raises(CapawareConfigError, match=None) as err:
        resolve_args(megatron_namespace(**values))
    assert message in str(err.value), str(err.value)


def test_what_wins_between_megatron_and_capaware_flags() -> None:
    # topk keeps Megatron's own capacity dropping and its flags.
    args = resolve_args(megatron_namespace(moe_router_type="topk", moe_expert_capacity_factor=1.0,
                                           moe_token_drop_policy="position", moe_pad_expert_input_to_capacity=True))
    assert config_from_args(args).router_type == "topk"
    # A negative Megatron capacity factor means "unset" to Megatron.
    resolve_args(megatron_namespace(moe_router_type="capacity-drop", moe_expert_capacity_factor=-1.0))
    # Megatron's --moe-token-drop-policy is the default of --capaware-drop-policy.
    args = resolve_args(megatron_namespace(moe_router_type="capacity-drop", moe_token_drop_policy="position"))
    assert args.capaware_drop_policy == "position" and config_from_args(args).drop_policy == "position"
    args = resolve_args(megatron_namespace(moe_router_type="capacity-drop", moe_token_drop_policy="probs"))
    assert config_from_args(args).drop_policy == "score"
    # Both given and agreeing is fine.
    args = resolve_args(megatron_namespace(moe_router_type="capacity-reroute", moe_token_drop_policy="position",
                                           capaware_drop_policy="position"))
    assert config_from_args(args).drop_policy == "position"


# --------------------------------------------------------------------------- parser plumbing


def test_add_capaware_args_is_idempotent_and_refuses_clashes() -> None:
    p = parser()
    assert add_capaware_args(p) is p
    other = argparse.ArgumentParser()
    other.add_argument("--moe-router-type")
    with pytest.raises(argparse.ArgumentError, match="already defines them"):
        add_capaware_args(other)


def test_with_capaware_args_composes_with_a_script_provider() -> None:
    def script_args(p):
        p.add_argument("--prompts", nargs="+")
        return p

    p = with_capaware_args(script_args)(argparse.ArgumentParser())
    args = p.parse_args(["--prompts", "a", "b", "--moe-router-type", "laser"])
    assert args.prompts == ["a", "b"] and config_from_args(args).router_type == "laser"
    assert with_capaware_args(None)(argparse.ArgumentParser()).parse_args([]).moe_router_type == "topk"


# --------------------------------------------------------------------------- Megatron's own parser


def megatron_parse(argv: List[str], monkeypatch) -> argparse.Namespace:
    from megatron_capaware.megatron_lm import import_megatron_training

    import_megatron_training()
    from megatron.training.arguments import parse_args

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py"] + argv)
    return parse_args(extra_args_provider=add_capaware_args)


class TestMegatronParser:
    pytestmark = needs_megatron_training

    def test_megatron_defines_none_of_our_flags(self) -> None:
        from megatron_capaware.megatron_lm import import_megatron_training

        import_megatron_training()
        from megatron.training.arguments import add_megatron_arguments

        megatron = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
        theirs = {o for a in megatron._actions for o in a.option_strings}
        ours = {o for a in parser()._actions for o in a.option_strings} - {"-h", "--help"}
        assert not ours & theirs
        assert "--moe-expert-capacity-factor" in theirs and "--moe-token-drop-policy" in theirs
        add_capaware_args(megatron)  # and adding them to Megatron's parser works

    def test_megatron_parses_every_flag(self, monkeypatch, tmp_path) -> None:
        args = megatron_parse(
            ["--num-experts", "8", "--moe-router-topk", "2", "--moe-router-type", "capacity-reroute",
             "--capaware-gamma", "1.1", "--capaware-reroute-rounds", "2", "--capaware-reroute-policy", "load",
             "--capaware-reroute-min-ratio", "0.1", "--capaware-drop-policy", "random", "--capaware-seed", "5",
             "--capaware-scope", "local", "--capaware-renormalize",
             "--capaware-stats-output", str(tmp_path / "s.json")],
            monkeypatch,
        )
        cfg = config_from_args(args)
        assert (cfg.router_type, cfg.gamma, cfg.reroute_rounds, cfg.reroute_policy, cfg.reroute_min_ratio,
                cfg.drop_policy, cfg.seed, cfg.scope, cfg.renormalize) == (
            "capacity-reroute", 1.1, 2, "load", 0.1, "random", 5, "local", True)
        assert args.capaware_stats_output == str(tmp_path / "s.json")
        laser = config_from_args(megatron_parse(
            ["--num-experts", "8", "--moe-router-type", "laser", "--capaware-laser-eps-high", "0.7",
             "--capaware-laser-t-fix", "0.4", "--capaware-laser-pool", "3", "--capaware-laser-waves", "2",
             "--capaware-laser-rounds", "2"], monkeypatch))
        assert (laser.laser_eps_high, laser.laser_t_fix, laser.laser_pool, laser.laser_waves,
                laser.laser_rounds) == (0.7, 0.4, 3, 2, 2)
        default = megatron_parse([], monkeypatch)
        assert config_from_args(default) == CapawareConfig()

    @pytest.mark.parametrize(
        "argv, message",
        [
            (["--moe-router-type", "capacity-drop", "--moe-expert-capacity-factor", "1.0"],
             "cannot be combined with Megatron's --moe-expert-capacity-factor 1"),
            (["--moe-router-type", "capacity-drop", "--moe-expert-capacity-factor", "1.0",
              "--moe-pad-expert-input-to-capacity"], "--moe-expert-capacity-factor"),
            (["--moe-router-type", "capacity-drop", "--moe-token-drop-policy", "position",
              "--capaware-drop-policy", "random"], "contradict each other"),
            (["--moe-router-type", "capacity-drop", "--moe-router-load-balancing-type", "sinkhorn"],
             "--moe-router-load-balancing-type sinkhorn"),
            (["--moe-router-type", "laser", "--moe-token-dispatcher-type", "flex"], "alltoall and allgather"),
            (["--moe-router-type", "laser", "--moe-router-enable-expert-bias"], "--moe-router-enable-expert-bias"),
            (["--moe-router-type", "laser", "--num-experts", "8", "--moe-router-topk", "4",
              "--capaware-laser-pool", "3"], "pool=3 is smaller than top-k=4"),
            (["--moe-router-type", "capacity-drop", "--num-experts", "2", "--moe-router-topk", "4"],
             "top-k=4 exceeds the number of experts 2"),
            (["--moe-router-type", "expanded-drop", "--tensor-model-parallel-size", "2"], "--sequence-parallel"),
            (["--capaware-gamma", "2"], "no effect with --moe-router-type topk"),
            (["--moe-router-type", "capacity-drop", "--capaware-gamma", "-1"], "must be > 0"),
        ],
    )
    def test_contradictions_fail_at_parse_time(self, argv, message, monkeypatch, capsys) -> None:
        with pytest.raises(SystemExit) as exit_:
            megatron_parse(argv, monkeypatch)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err

    def test_megatron_token_drop_policy_is_honoured(self, monkeypatch) -> None:
        args = megatron_parse(["--moe-router-type", "capacity-drop", "--moe-token-drop-policy", "position"],
                              monkeypatch)
        assert config_from_args(args).drop_policy == "position"
        # topk: Megatron's own capacity dropping, untouched.
        args = megatron_parse(["--moe-expert-capacity-factor", "1.0", "--moe-token-drop-policy", "position",
                               "--moe-pad-expert-input-to-capacity"], monkeypatch)
        assert args.moe_expert_capacity_factor == 1.0 and config_from_args(args).router_type == "topk"


BUNDLED_PLAN = Path(__file__).resolve().parents[1] / "megatron_capaware/models/reference_models/shakespeare-moe-8x2"


def test_placement_flags_reach_the_namespace_and_default_the_replica_policy() -> None:
    plan = str(BUNDLED_PLAN / "placement-ep2-r2.json")
    args = parse(["--capaware-placement", plan, "--capaware-replica-policy", "round-robin"])
    assert args.capaware_placement == plan and args.capaware_replica_policy == "round-robin"
    args = parse(["--capaware-placement", plan])
    assert args.capaware_replica_policy == "least-loaded"
    assert parse([]).capaware_placement is None


@pytest.mark.parametrize("argv,message", [
    (["--capaware-replica-policy", "round-robin"], "needs --capaware-placement"),
    (["--capaware-placement", "/nonexistent/plan.json"], "--capaware-placement /nonexistent/plan.json"),
    (["--capaware-placement", str(BUNDLED_PLAN / "placement-ep2-r2.json"), "--moe-router-type", "laser"],
     "redundant experts is not supported yet"),
])
def test_bad_placement_flags_fail_at_parse_time(argv, message, capsys) -> None:
    assert message in parse_error(argv, capsys)


def test_a_plan_for_another_ep_size_fails_at_parse_time(capsys) -> None:
    p = parser()
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    with pytest.raises(SystemExit):
        p.parse_args(["--capaware-placement", str(BUNDLED_PLAN / "placement-ep2-r0.json"),
                      "--expert-model-parallel-size", "4"])
    assert "run capaware-plan --ep 4" in capsys.readouterr().err
