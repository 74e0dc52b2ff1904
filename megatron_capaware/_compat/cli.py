"""How the command-line entry points report a user's mistake, and what they keep quiet.

* A mistake in the user's input (configuration, router spec, checkpoint,
  calibration file, text, parallel sizes) prints one line
  ``PROG: error: MESSAGE`` on stderr and exits 2, as argparse does.
  ``--debug`` (or ``CAPAWARE_DEBUG=1``) shows the traceback instead. Any
  other exception is a bug and keeps its traceback.
* Inside a rank launched by :func:`run_torchrun`, such a mistake is written
  once to a shared file (the first rank to fail wins) and the rank exits 2;
  the parent prints that one line, naming the rank, and drops torchrun's own
  failure report.
* Megatron's optional-dependency warnings (Apex, Transformer Engine, its
  deprecations) are filtered once, here; ``--verbose`` keeps them.
* Progress bars draw only on a terminal (:func:`progress_enabled`).
"""

from __future__ import annotations

from megatron_capaware.errors import CapawareError, UserInputError  # noqa: F401 (UserInputError re-exported)

import argparse
import logging
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Type

DEBUG_ENV = "CAPAWARE_DEBUG"
VERBOSE_ENV = "CAPAWARE_VERBOSE"
ERROR_FILE_ENV = "CAPAWARE_ERROR_FILE"
TTY_ENV = "CAPAWARE_PROGRESS_TTY"
USER_ERROR_EXIT = 2




def user_error_types() -> Tuple[Type[BaseException], ...]:
    """The exception types that mean the user's input is wrong (not a bug): :class:`CapawareError`."""
    return (CapawareError,)


def add_cli_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--debug`` and ``--verbose`` on an entry point's parser."""
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an input error (also CAPAWARE_DEBUG=1)")
    parser.add_argument("--verbose", action="store_true",
                        help="keep Megatron's optional-dependency and deprecation warnings")
    return parser


def _flag(argv: Sequence[str], name: str, env: str) -> bool:
    return name in argv or os.environ.get(env, "") not in ("", "0")


def quiet_megatron(verbose: bool = False) -> None:
    """Filter Megatron's optional-dependency warnings (once per process; no-op when verbose)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # ranks launched from here keep them too
        return
    # Megatron's import-time warnings (missing Apex / TE, deprecations) say nothing the user can act on.
    warnings.simplefilter("ignore")
    # Megatron logs the missing Apex / TE at WARNING through its module loggers.
    logging.getLogger("megatron").setLevel(logging.ERROR)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def progress_enabled(requested: bool = True) -> bool:
    """Draw a progress bar only on a terminal (the launcher passes the parent's TTY to its ranks)."""
    if not requested:
        return False
    if os.environ.get(TTY_ENV) is not None:
        return os.environ[TTY_ENV] == "1"
    return sys.stderr.isatty()


def _rank() -> Optional[int]:
    rank = os.environ.get("RANK")
    return int(rank) if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else None


def _first_to_fail(path: Path, content: str) -> bool:
    """Create ``path`` with ``content`` unless another rank already did (atomic)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    return True


def report_user_error(prog: str, err: BaseException) -> int:
    """Print (or, inside a launched rank, record) one line for ``err``; returns the exit code.

    Inside a rank of :func:`run_torchrun` the first failing rank records it and
    the parent prints it. Inside a rank of a torchrun the user started, the
    first failing rank on this node prints it (a marker file named after
    torchrun's run id); the others stay silent.
    """
    import tempfile

    message = " ".join(str(err).split()) or type(err).__name__
    rank = _rank()
    line = f"{prog}: error: {message}" + (f" (rank {rank})" if rank is not None else "")
    if rank is not None:
        error_file = os.environ.get(ERROR_FILE_ENV)
        if error_file:
            _first_to_fail(Path(error_file), f"{rank}\n{message}\n")
            return USER_ERROR_EXIT
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        if run_id and not _first_to_fail(Path(tempfile.gettempdir()) / f"capaware-user-error-{run_id}", line):
            return USER_ERROR_EXIT
    print(line, file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


def run_cli(
    prog: str, main: Callable[[List[str]], int], argv: Optional[Sequence[str]] = None, *, own_flags: bool = True
) -> int:
    """Run an entry point's ``main(argv)``: input errors as one line and exit 2, bugs with tracebacks.

    ``own_flags=False`` for entry points whose command line belongs to Megatron
    or to a script (``--debug`` / ``--verbose`` may mean something else there):
    then only ``CAPAWARE_DEBUG`` / ``CAPAWARE_VERBOSE`` apply.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    seen = args if own_flags else []
    quiet_megatron(verbose=_flag(seen, "--verbose", VERBOSE_ENV))
    from megatron_capaware._compat.cpu_shims import apply_cpu_shims

    # The console scripts' explicit switch: CPU stand-ins for Megatron-Core (no-op with CUDA).
    if apply_cpu_shims() and argv is None:
        # A process of its own (not a test calling main in-process): Megatron's jit_fuser
        # (torch.compile) costs ~17 s a process on a CPU.
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    debug = _flag(seen, "--debug", DEBUG_ENV)
    try:
        return main(args)
    except user_error_types() as err:
        if debug:
            raise
        return report_user_error(prog, err)
    except FileNotFoundError as err:  # a path the user gave (checkpoint, text, calibration)
        if debug:
            raise
        what = f"{err.strerror}: {err.filename}" if err.filename else str(err)
        return report_user_error(prog, UserInputError(what))


def run_torchrun(prog: str, world: int, module: str, argv: Sequence[str], env: Optional[dict] = None) -> int:
    """Run ``python -m module argv`` under torchrun with ``world`` local ranks.

    Its output is passed through as it comes. When a rank reports an input
    error, the parent prints that one line (naming the rank), drops
    torchrun's failure report and returns 2; any other failure returns
    torchrun's exit code with everything it printed.
    """
    import tempfile

    env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="capaware-") as tmp:
        error_file = Path(tmp) / "user-error.txt"
        env[ERROR_FILE_ENV] = str(error_file)
        env.setdefault(TTY_ENV, "1" if sys.stderr.isatty() else "0")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", module, *argv]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        held: List[bytes] = []

        def forward() -> None:
            assert proc.stderr is not None
            while True:
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk:
                    return
                if error_file.exists():
                    held.append(chunk)  # torchrun's report of the failed ranks: not shown
                else:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.buffer.flush()

        reader = threading.Thread(target=forward, daemon=True)
        reader.start()
        code = proc.wait()
        reader.join(timeout=10)
        if error_file.exists():
            rank, _, message = error_file.read_text().partition("\n")
            print(f"{prog}: error: {message.strip()} (rank {rank.strip()})", file=sys.stderr, flush=True)
            return USER_ERROR_EXIT
        if held:
            sys.stderr.buffer.write(b"".join(held))
            sys.stderr.buffer.flush()
        return code
