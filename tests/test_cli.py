"""The command lines: capaware-generate and the launcher, on a tiny checkpoint.

The commands of the documented quick-start block (docs/megatron_lm.md, and
README.md once it carries the same block) are run exactly as written, with
``CKPT`` set to a tiny checkpoint saved here, and their output is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest

from megatron_capaware.megatron_lm.arguments import add_capaware_args, config_from_args
from megatron_capaware._compat.launcher import run_distributed
from tests.helpers.cli_workers import make_tiny_checkpoint, reference_greedy
from tests.helpers.megatron_training_support import ROOT, needs_megatron_training, run_cli, torchrun

pytestmark = needs_megatron_training

MARKER = "<!-- tested-commands:"
STANDIN = "examples/megatron_style_static_inference.py"


def documented_commands() -> List[tuple]:
    """(source, command) for each command of the tested block in the docs and README."""
    out = []
    for name in ("docs/megatron_lm.md", "README.md"):
        path = ROOT / name
        if not path.exists():
            continue
        text = path.read_text()
        if MARKER not in text:
            continue
        block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append((name, line))
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny-moe"
    run_distributed(make_tiny_checkpoint, 1, {"ckpt": str(path)}, timeout_s=240)
    return path


def expected_router(command: str) -> str:
    """What the command's capaware flags describe (as the stats title prints it)."""
    parser = add_capaware_args(argparse.ArgumentParser())
    args, _ = parser.parse_known_args(shlex.split(command))
    return config_from_args(args).describe()


def check_generation_output(out: str, prompts: List[str]) -> Dict[int, str]:
    """Every prompt printed with a non-empty continuation; returns the continuations."""
    outputs = {}
    for i, prompt in enumerate(prompts):
        assert f"prompt {i}: {prompt}\n" in out, out[-3000:]
        match = re.search(rf"^output {i}: (.*)$", out, re.M)
        assert match and match.group(1).strip(), f"no generated text for prompt {i}:\n{out[-3000:]}"
        outputs[i] = match.group(1)
    return outputs


def check_stats_output(out: str, router: str, ep: int) -> None:
    title = f"megatron-capaware load stats: router {router}, EP={ep}, 2 MoE layers"
    assert title in out, out[-3000:]
    table = out[out.index(title):]
    for layer in (1, 2):
        row = re.search(rf"^\s+{layer}\s+(\d+)\s+([\d.]+)\s+([\d.]+)", table, re.M)
        assert row and int(row.group(1)) > 0, table
        assert float(row.group(2)) >= 1.0  # max/mean
    assert re.search(r"I_agg [\d.]+\s+rank I_agg [\d.]+\s+dropped [\d.]+%", table), table


COMMANDS = documented_commands()


def test_the_docs_hold_the_tested_commands() -> None:
    sources = {source for source, _ in COMMANDS}
    assert "docs/megatron_lm.md" in sources
    text = " ".join(command for _, command in COMMANDS)
    assert "megatron_capaware.generate" in text and "megatron_capaware.launch" in text
    assert "--expert-model-parallel-size 2" in text and "--nproc-per-node 2" in text


@pytest.mark.multirank
@pytest.mark.parametrize("source, command", COMMANDS, ids=[f"{s}:{i}" for i, (s, _) in enumerate(COMMANDS)])
def test_documented_command_runs_as_written(source, command, tiny_ckpt, tmp_path) -> None:
    env = {"CKPT": str(tiny_ckpt), "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = run_cli(["bash", "-c", command], env=env, timeout=300)
    out = result.stdout
    assert result.returncode == 0, f"{command}\n--- stdout\n{out[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    tokens = shlex.split(command)
    prompts = tokens[tokens.index("--prompts") + 1:]
    prompts = prompts[: next((i for i, t in enumerate(prompts) if t.startswith("--")), len(prompts))]
    check_generation_output(out, prompts)
    ep = 2 if "--expert-model-parallel-size 2" in command else 1
    check_stats_output(out, expected_router(command), ep)
    if "megatron_capaware.launch" in command:
        assert "megatron-capaware: routing with" in out
    assert "megatron-capaware: model flags from" in out  # architecture from capaware_model.json
    assert "using the checkpoint's tokenizer" in out


@pytest.fixture(scope="module")
def reference(tiny_ckpt) -> List[dict]:
    spec = {"ckpt": str(tiny_ckpt), "prompts": ["To be, or not to be", "My lord"], "tokens": 6}
    return run_distributed(reference_greedy, 1, spec, timeout_s=240)[0]


def test_generate_matches_the_package_loader(tiny_ckpt, reference, tmp_path) -> None:
    """Megatron's parser + get_model + load_checkpoint + static engine (KV cache) reproduce
    the package's own loader with a full-recompute greedy loop."""
    stats_path, out_path = tmp_path / "stats.json", tmp_path / "gen.json"
    result = run_cli(
        [sys.executable, "-m", "megatron_capaware.generate", "--load", str(tiny_ckpt),
         "--prompts", "To be, or not to be", "My lord", "--num-tokens-to-generate", "6",
         "--return-log-probs", "--output-path", str(out_path), "--capaware-stats-output", str(stats_path)],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    generations = json.loads(out_path.read_text())["generations"]
    for mine, ref in zip(generations, reference):
        assert mine["prompt"] == ref["prompt"]
        assert mine["generated_tokens"] == ref["generated_tokens"]
        assert mine["generated_log_probs"] == pytest.approx(ref["generated_log_probs"], abs=1e-4)
    stats = json.loads(stats_path.read_text())
    assert stats["format"] == "capaware-load-stats/1" and stats["router"] == "topk"
    assert sorted(stats["layers"]) == ["1", "2"]
    # A forward call for the prompts' common prefix, then one per further position.
    assert all(layer["calls"] >= 6 for layer in stats["layers"].values())
    assert stats["layers"]["1"]["dropped_frac"] == 0.0


def test_launcher_with_topk_leaves_megatron_unchanged(tiny_ckpt, reference, tmp_path) -> None:
    prompts = [r["prompt"] for r in reference]
    base = [sys.executable, "-m", "megatron_capaware.launch", STANDIN, "--load", str(tiny_ckpt),
            "--prompts", *prompts, "--num-tokens-to-generate", "6"]
    plain = run_cli(base)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    outputs = check_generation_output(plain.stdout, prompts)
    assert "megatron-capaware: routing" not in plain.stdout and "load stats" not in plain.stdout
    assert outputs == {i: r["generated_text"] for i, r in enumerate(reference)}
    # Asking for stats installs the topk adapter, which routes exactly as Megatron.
    stats_path = tmp_path / "stats.json"
    recorded = run_cli(base + ["--capaware-stats-output", str(stats_path)])
    assert recorded.returncode == 0, recorded.stdout[-3000:] + recorded.stderr[-3000:]
    assert check_generation_output(recorded.stdout, prompts) == outputs
    check_stats_output(recorded.stdout, "topk", 1)
    assert json.loads(stats_path.read_text())["layers"]["2"]["calls"] >= 6


@pytest.mark.parametrize(
    "command, message",
    [
        (["-m", "megatron_capaware.generate", "--moe-router-type", "capacity-drop",
          "--moe-expert-capacity-factor", "1.0"], "cannot be combined with Megatron's --moe-expert-capacity-factor"),
        (["-m", "megatron_capaware.launch", STANDIN, "--moe-router-type", "laser", "--capaware-gamma", "2"],
         "--capaware-gamma has no effect with --moe-router-type laser"),
        (["-m", "megatron_capaware.launch", STANDIN, "--moe-router-type", "capacity-drop",
          "--moe-token-drop-policy", "position", "--capaware-drop-policy", "score"], "contradict each other"),
    ],
)
def test_contradictions_stop_the_clis_at_parse_time(command, message, tiny_ckpt) -> None:
    result = run_cli([sys.executable, *command, "--load", str(tiny_ckpt)], timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert message in result.stderr
    assert "initializing torch distributed" not in result.stdout  # nothing was initialised


PARSE_ONLY = textwrap.dedent(
    """
    from megatron.training.arguments import parse_args

    def script_args(parser):
        parser.add_argument("--my-flag", type=int, default=0)
        return parser

    args = parse_args(extra_args_provider=script_args)
    print("PARSED", args.my_flag, args.moe_router_type, args.capaware_gamma, args.capaware_drop_policy)
    """
)


def test_launcher_registers_the_flags_for_scripts_and_modules(tmp_path) -> None:
    (tmp_path / "parse_only.py").write_text(PARSE_ONLY)
    flags = ["--my-flag", "3", "--moe-router-type", "capacity-drop", "--moe-token-drop-policy", "position"]
    script = run_cli([sys.executable, "-m", "megatron_capaware.launch", str(tmp_path / "parse_only.py"), *flags])
    assert "PARSED 3 capacity-drop 1.25 position" in script.stdout, script.stdout + script.stderr
    module = run_cli([sys.executable, "-m", "megatron_capaware.launch", "-m", "parse_only", *flags],
                     env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert "PARSED 3 capacity-drop 1.25 position" in module.stdout, module.stdout + module.stderr


def test_launcher_usage_errors(tmp_path) -> None:
    missing = run_cli([sys.executable, "-m", "megatron_capaware.launch"], timeout=60)
    assert missing.returncode == 2 and "give the Megatron-LM script to run" in missing.stderr
    absent = run_cli([sys.executable, "-m", "megatron_capaware.launch", str(tmp_path / "nope.py")], timeout=60)
    assert absent.returncode == 2 and "does not exist" in absent.stderr


def test_generate_defaults_to_the_bundled_model(tiny_ckpt, monkeypatch) -> None:
    from megatron_capaware.megatron_lm import generate

    monkeypatch.setattr(generate, "default_checkpoint", lambda: str(tiny_ckpt))
    assert generate.with_default_load(["--prompts", "x"]) == ["--prompts", "x", "--load", str(tiny_ckpt)]
    assert generate.with_default_load(["--load", "/elsewhere"]) == ["--load", "/elsewhere"]
    monkeypatch.setattr(generate, "default_checkpoint", lambda: None)
    assert generate.with_default_load(["--prompts", "x"]) is None


def test_default_checkpoint_is_the_reference_model_when_installed(tiny_ckpt, monkeypatch) -> None:
    import types

    from megatron_capaware.megatron_lm import generate

    fake = types.ModuleType("megatron_capaware.models.reference_models")
    fake.REFERENCE_MODEL_DIR = tiny_ckpt
    monkeypatch.setitem(sys.modules, "megatron_capaware.models.reference_models", fake)
    assert generate.default_checkpoint() == str(tiny_ckpt)
    fake.REFERENCE_MODEL_DIR = tiny_ckpt / "not-there"
    assert generate.default_checkpoint() is None


def test_example_script_and_launcher_leave_a_scripts_own_routers_alone(tiny_ckpt) -> None:
    """examples/generate_text.py installs the routers itself; launched, it is not done twice."""
    result = run_cli([sys.executable, "-m", "megatron_capaware.launch", "examples/generate_text.py",
                      "--load", str(tiny_ckpt), "--moe-router-type", "capacity-drop", "--capaware-gamma", "1.0",
                      "--prompts", "To be", "--num-tokens-to-generate", "4"])
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert re.search(r"^'To be' -> '.+'$", out, re.M), out[-3000:]
    assert out.count("megatron-capaware load stats: router capacity-drop(gamma=1), EP=1") == 1
    assert "megatron-capaware: routing with" not in out and "warning" not in out


@pytest.mark.multirank
@pytest.mark.parametrize("entry", ["generate", "launch"])
def test_placement_flag_moves_experts_and_keeps_the_text(entry, tiny_ckpt, reference, tmp_path) -> None:
    """--capaware-placement at EP 2 (replicated plan): the greedy text of the unplaced model at EP 1."""
    from tests.helpers.placement_workers import make_plan

    plan = make_plan([1, 2], 8, 2, redundant=2, seed=3)
    plan.save(tmp_path / "plan.json")
    prompts = [r["prompt"] for r in reference]
    head = ["-m", "megatron_capaware.generate"] if entry == "generate" else \
        ["-m", "megatron_capaware.launch", STANDIN]
    stats_path = tmp_path / "stats.json"
    result = run_cli([*torchrun(), "--standalone", "--nproc-per-node", "2", *head, "--load", str(tiny_ckpt),
                      "--expert-model-parallel-size", "2", "--capaware-placement", str(tmp_path / "plan.json"),
                      "--capaware-stats-output", str(stats_path), "--prompts", *prompts,
                      "--num-tokens-to-generate", "6"], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert check_generation_output(result.stdout, prompts) == {i: r["generated_text"] for i, r in enumerate(reference)}
    if entry == "generate":
        assert "experts placed by" in result.stdout
    stats = json.loads(stats_path.read_text())
    assert all(layer["calls"] >= 6 for layer in stats["layers"].values())
