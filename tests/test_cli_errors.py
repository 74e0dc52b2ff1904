"""A user's mistake on the command line: one line ``PROG: error: ...`` on stderr, exit 2.

Each case runs the real console script in a subprocess, as a user would,
with its default launcher (torchrun for ``capaware-eval --ep 2``). A bug
(any other exception) keeps its traceback; ``--debug`` shows it for input
errors too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from tests.helpers.megatron_training_support import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "megatron_capaware/models/reference_models/shakespeare-moe-8x2/laser_calibration.json"


def run(args: List[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = subprocess_env()
    for key in ("CAPAWARE_DEBUG", "CAPAWARE_VERBOSE", "PYTHONWARNINGS"):  # as a user's shell has them
        env.pop(key, None)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def script(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def assert_one_line(result: subprocess.CompletedProcess, prog: str, fragment: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def other_model_calibration(tmp_path_factory) -> Path:
    """A LASER calibration file made for a model with two MoE layers."""
    data = json.loads(CALIBRATION.read_text())
    data["model"]["moe_layer_numbers"] = [1, 2]
    data["layers"] = {k: v for k, v in data["layers"].items() if k in ("1", "2")}
    path = tmp_path_factory.mktemp("cal") / "other.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def short_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text("To be, or not to be.\n")
    return path


EVAL_CASES = [
    (["--routers", "capacity-drop:gamma=0"], "capacity factor gamma=0.0 must be > 0"),
    (["--routers", "bogus"], "unknown router type 'bogus'"),
    (["--routers", "capacity-drop:gama=1"], "unknown key 'gama'"),
    (["--ep", "3"], "--ep 3 does not divide the model's 8 experts"),
    (["--tp", "3"], "--tp 3 does not divide the model's 4 attention heads; use --tp 1, 2, 4"),
    (["--checkpoint", "/nonexistent"], "pass --checkpoint a megatron-capaware checkpoint root"),
    (["--text", "/dev/null"], "pass --text with a UTF-8 text file"),
]


@pytest.mark.parametrize("ep", [1, 2])
@pytest.mark.parametrize("argv, fragment", EVAL_CASES)
def test_eval_input_errors_are_one_line(argv, fragment, ep) -> None:
    extra = [] if "--ep" in argv else ["--ep", str(ep)]
    assert_one_line(run([script("capaware-eval"), *argv, *extra]), "capaware-eval", fragment)


@pytest.mark.parametrize("ep", [1, 2])
def test_eval_refuses_a_calibration_for_another_model(other_model_calibration, ep) -> None:
    result = run([script("capaware-eval"), "--routers", f"laser:calibration={other_model_calibration}",
                  "--ep", str(ep)])
    assert_one_line(result, "capaware-eval", "it was made for a different model; run capaware-calibrate")


def test_eval_refuses_a_text_shorter_than_one_batch(short_text) -> None:
    assert_one_line(run([script("capaware-eval"), "--text", str(short_text)]), "capaware-eval",
                    "give a longer --text, or a smaller --seq-len / --sequences-per-rank")


def test_calibrate_input_errors_are_one_line() -> None:
    assert_one_line(run([script("capaware-calibrate"), "--ep", "3"]), "capaware-calibrate",
                    "--ep 3 does not divide the model's 8 experts")
    assert_one_line(run([script("capaware-calibrate"), "--target-reduction", "0"]), "capaware-calibrate",
                    "--target-reduction 0.0 is invalid: it must be > 0")


def test_debug_shows_the_traceback() -> None:
    result = run([script("capaware-eval"), "--routers", "bogus", "--debug"])
    assert result.returncode != 0 and "Traceback" in result.stderr and "CapawareConfigError" in result.stderr


@pytest.mark.multirank
def test_an_error_inside_the_ranks_is_printed_once(tiny_checkpoint, tmp_path) -> None:
    """A checkpoint whose weights do not match its model description fails at load, on every rank:
    one line, naming a rank, and no torchrun failure report."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint["checkpoint"], ckpt)
    model_json = ckpt / "capaware_model.json"
    args = json.loads(model_json.read_text())
    args["moe_ffn_hidden_size"] *= 2  # the stored expert weights no longer fit
    model_json.write_text(json.dumps(args))
    result = run([script("capaware-eval"), "--checkpoint", str(ckpt), "--text", tiny_checkpoint["heldout"],
                  "--routers", "topk", "--seq-len", "32", "--sequences-per-rank", "2", "--ep", "2",
                  "--no-plots", "--out", str(tmp_path / "out")])
    assert_one_line(result, "capaware-eval", "(rank ")
    assert "ChildFailedError" not in result.stderr


def test_convert_prints_its_result_and_nothing_else(tmp_path) -> None:
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT))
    from tests.helpers.hf_workers import build_hf

    build_hf("mixtral", tmp_path / "hf")
    result = run([script("capaware-convert"), str(tmp_path / "hf"), str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"wrote {tmp_path / 'out'} (mixtral"), lines
    verbose = run([script("capaware-convert"), str(tmp_path / "hf"), str(tmp_path / "out2"), "--verbose"])
    assert verbose.returncode == 0 and "Transformer Engine" in verbose.stderr  # the warnings are kept
    again = run([script("capaware-convert"), str(tmp_path / "hf"), str(tmp_path / "out")])
    assert_one_line(again, "capaware-convert", "pass --force to replace it")


def test_progress_bars_draw_only_on_a_terminal(monkeypatch) -> None:
    from megatron_capaware._compat import cli

    monkeypatch.delenv(cli.TTY_ENV, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not cli.progress_enabled(True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.progress_enabled(True) and not cli.progress_enabled(False)
    monkeypatch.setenv(cli.TTY_ENV, "0")  # a rank whose launcher's stderr is a log file
    assert not cli.progress_enabled(True)


def test_a_bug_keeps_its_traceback(monkeypatch, capsys) -> None:
    from megatron_capaware._compat import cli

    def broken(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run_cli("prog", broken, [])
    monkeypatch.setenv("CAPAWARE_DEBUG", "0")
    assert cli.run_cli("prog", lambda argv: (_ for _ in ()).throw(cli.UserInputError("bad x; use y")), []) == 2
    assert capsys.readouterr().err == "prog: error: bad x; use y\n"


def test_every_entry_point_has_help() -> None:
    for name in ("capaware-eval", "capaware-calibrate", "capaware-convert", "capaware-bench-straggler",
                 "capaware-bench-overhead"):
        result = run([script(name), "--help"], timeout=120)
        assert result.returncode == 0 and "--debug" in result.stdout and "--verbose" in result.stdout, name
    assert os.environ.get("CAPAWARE_DEBUG") in (None, "", "0")
