"""Run any Megatron-LM script with the capaware routers, without editing it.

::

    python -m megatron_capaware.launch SCRIPT.py [SCRIPT ARGS...]
    python -m megatron_capaware.launch -m PACKAGE.MODULE [ARGS...]
    torchrun --nproc-per-node 2 -m megatron_capaware.launch SCRIPT.py --moe-router-type laser ...

Before running ``SCRIPT.py`` as ``__main__`` (``runpy``), the launcher:

* registers ``--moe-router-type`` and the ``--capaware-*`` flags by wrapping
  ``megatron.training.arguments.parse_args``, so whatever
  ``extra_args_provider`` the script passes (to ``parse_and_validate_args``
  in Megatron-LM >= 0.18, to ``initialize_megatron`` before) gets them added
  and checked at parse time;
* when ``--load`` is a megatron-capaware checkpoint, makes its
  ``capaware_model.json`` the default of Megatron's architecture flags and
  its ``tokenizer/tokenizer.json`` the tokenizer (unless the command line
  names one);
* swaps the routers into every Megatron ``MoELayer`` the script builds, at
  the layer's first forward (after the model is built, wrapped and loaded,
  whichever builder made it: ``get_model``, Megatron-LM's ``ModelBuilder``,
  or the script's own code);
* at the end (the script's ``torch.distributed.destroy_process_group()``, or
  its normal return), prints the per-layer load statistics on rank 0 and
  writes ``--capaware-stats-output``.

With ``--moe-router-type topk`` and no ``--capaware-stats-output`` nothing is
swapped: the script runs exactly as without the launcher. On a machine
without CUDA the launcher also applies :func:`megatron_lm.enable_dynamic_engine`
(``enable_cpu_support`` plus the dynamic engine's stand-ins, so Megatron-LM's
dynamic-path scripts ``offline_inference.py``, ``launch_inference_server.py``
and ``gpt_dynamic_inference.py`` run; ``StaticInferenceEngine`` is still built
with torch's own pinning, keeping its legacy fallback) and starts the processes
those scripts spawn through :mod:`megatron_capaware.megatron_lm.spawn_main`.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import weakref
from typing import Any, Dict, List, Optional

from megatron_capaware import megatron_lm
from megatron_capaware._compat.cli import run_cli
from megatron_capaware._compat.dynamic_engine_cpu import pinning_as_torch_does
from megatron_capaware.megatron_lm.spawn_main import spawn_children_through_this_module
from megatron_capaware.adapters.guards import DeferredScoreCheck
from megatron_capaware.registry import TOPK


PROG = "python -m megatron_capaware.launch"


class LaunchSession:
    """State of one launched run: the router config, the installed layers, the report."""

    def __init__(self) -> None:
        self.layers: List[Any] = []  # (weakref to MoELayer, LayerRoutingStats)
        self.reported = False
        self._config: Any = None
        self._calibration: Any = None
        self.announced = False
        self.installed_elsewhere = False
        self._plan: Any = None
        self.step_hook_installed = False
        # One deferred score check for every MoE layer of the process (read once per model forward).
        self.score_check = DeferredScoreCheck(None, 0)

    # -- configuration -----------------------------------------------------

    def megatron_args(self) -> Any:
        try:
            from megatron.training import get_args

            return get_args()
        except (AssertionError, ImportError):  # args not parsed (model built outside megatron.training)
            return None

    def config(self) -> Any:
        if self._config is None:
            args = self.megatron_args()
            if args is None or not hasattr(args, "moe_router_type"):
                return None
            from megatron_capaware.megatron_lm.arguments import config_from_args

            self._config = config_from_args(args)
        return self._config

    def wanted(self) -> bool:
        """Whether routers must be installed: a capaware router, or stats asked for."""
        from megatron_capaware.megatron_lm.arguments import stats_requested

        cfg = self.config()
        if cfg is None:
            return False
        return cfg.router_type != TOPK or stats_requested(self.megatron_args()) or self.plan() is not None

    def plan(self) -> Any:
        """The ``--capaware-placement`` plan (loaded once), or None."""
        if self._plan is None:
            from megatron_capaware.megatron_lm.arguments import placement_from_args

            args = self.megatron_args()
            path = placement_from_args(args) if args is not None else None
            if path:
                from megatron_capaware.placement import load_plan

                self._plan = load_plan(path)
        return self._plan

    # -- hooks ---------------------------------------------------------------

    def register_layer(self, layer: Any) -> None:
        """Called at the end of every ``MoELayer.__init__``: install at its first forward."""
        if getattr(layer, "_capaware_launch_hook", None) is not None:
            return
        if not self.step_hook_installed and self.wanted():
            # The routers are installed at a layer's first forward, which already runs inside the
            # first step's TransformerLayer._forward_mlp: the hook that gives them the dynamic
            # step (padding rows, phase) must wrap it before any forward, or that first step
            # (the first prefill) is routed as if it had no padding rows.
            from megatron_capaware.adapters.inference_padding import install_dynamic_padding_hook

            install_dynamic_padding_hook()
            self.step_hook_installed = True
        self.score_check.expected += 1  # every MoE layer built here routes once per model forward
        layer._capaware_launch_hook = layer.register_forward_pre_hook(self._first_forward)

    def _first_forward(self, layer: Any, inputs: Any) -> None:
        layer._capaware_launch_hook.remove()
        layer._capaware_launch_hook = None
        if getattr(layer.router, "capaware_installed", False):
            # The script (or a capaware spec) installed the routers itself: leave them.
            self.installed_elsewhere = True
            return
        if not self.wanted():
            return
        from megatron_capaware.adapters.install import install_layers

        cfg = self.config()
        # The one installer, for this layer: validate, ranks agree, place (every EP rank runs this
        # layer's first forward: its experts move now), install; one score check per model forward.
        (state,) = install_layers([layer], cfg, placement=self.plan(), whole_model=False,
                                  replica_policy=self.megatron_args().capaware_replica_policy,
                                  score_check=self.score_check)
        if state.stats is not None:
            self.layers.append((weakref.ref(layer), state.stats))
        if not self.announced:
            self.announced = True
            megatron_lm.print_rank0(
                f"megatron-capaware: routing with {cfg.describe()} (installed in each MoE layer at "
                "its first forward)"
            )

    # -- end of run ----------------------------------------------------------

    def stats(self) -> Dict[int, Any]:
        out: Dict[int, Any] = {}
        for _, stats in self.layers:  # --capaware-scope local: sum the device records over the group
            stats.reduce_pending()  # (collective; every rank installed the same layers in the same order)
        for ref, stats in self.layers:
            if ref() is not None and (stats.global_loads or stats.layer_number not in out):
                out[stats.layer_number] = stats
        return out

    def finish(self) -> None:
        """Print and write the load statistics (every rank calls this once)."""
        if self.reported:
            return
        self.reported = True
        if not self.layers:
            cfg = self.config()
            if cfg is not None and cfg.router_type != TOPK and not self.installed_elsewhere:
                megatron_lm.print_rank0(
                    f"megatron-capaware: warning: --moe-router-type {cfg.router_type} was given "
                    "but no MoE layer ran a forward pass"
                )
            return
        from megatron_capaware.megatron_lm.arguments import stats_requested

        args = self.megatron_args()
        output = args.capaware_stats_output if stats_requested(args) else None
        megatron_lm.report_stats(self.stats(), self.config(), output)


SESSION: Optional[LaunchSession] = None


def install_hooks() -> LaunchSession:
    """Patch ``megatron.training`` and Megatron-Core for this process (idempotent).

    Raises:
        megatron_lm.MegatronTrainingUnavailable: no ``megatron.training``.
    """
    global SESSION
    if SESSION is not None:
        return SESSION
    megatron_lm.import_megatron_training()
    # CPU support for megatron.training and the dynamic engine (offline_inference.py,
    # launch_inference_server.py, gpt_dynamic_inference.py). No-op with CUDA.
    megatron_lm.enable_dynamic_engine()
    if getattr(sys.modules.get("triton"), "capaware_cpu_stand_in", False):
        # Processes the engine spawns (coordinator, HTTP frontends) re-import the script as their
        # main: they get the triton stand-in first (see megatron_lm/spawn_main.py).
        spawn_children_through_this_module()
    megatron_lm.install_tokenizer_hook()
    session = LaunchSession()

    import megatron.training.arguments as arguments

    original_parse = arguments.parse_args

    def parse_args(*args: Any, **kwargs: Any) -> Any:
        if "extra_args_provider" in kwargs:
            kwargs["extra_args_provider"] = megatron_lm.extra_args_provider(kwargs["extra_args_provider"])
        elif args:
            args = (megatron_lm.extra_args_provider(args[0]),) + tuple(args[1:])
        else:
            kwargs["extra_args_provider"] = megatron_lm.extra_args_provider(None)
        return original_parse(*args, **kwargs)

    megatron_lm.replace_function(arguments, "parse_args", parse_args)

    from megatron.core.transformer.moe.moe_layer import MoELayer

    original_init = MoELayer.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        session.register_layer(self)

    MoELayer.__init__ = __init__  # type: ignore[method-assign]

    _report_engine_fallback()

    import torch.distributed as dist

    original_destroy = dist.destroy_process_group

    def destroy_process_group(group: Any = None) -> Any:
        if group is None and dist.is_initialized():
            session.finish()
        return original_destroy(group)

    megatron_lm.replace_function(dist, "destroy_process_group", destroy_process_group)
    SESSION = session
    return session


FALLBACK_WARNING = "Error initializing dynamic engine"


def _report_engine_fallback() -> None:
    """Say when ``StaticInferenceEngine(legacy=False)`` fell back to the legacy engine.

    Megatron only warns (``Error initializing dynamic engine: ..., using legacy
    static engine``), and the CLIs filter Megatron's warnings; but the engine
    decides what the routers see (the dynamic engine pads steps, the legacy
    one does not), so the launcher prints it on rank 0. Other warnings raised
    while the engine is built are passed on unchanged.
    """
    import warnings

    try:
        from megatron.core.inference.engines import static_engine
    except ImportError:
        return
    cls = getattr(static_engine, "StaticInferenceEngine", None)
    if cls is None or getattr(cls.__init__, "capaware_fallback_report", False):
        return
    original_init = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        # Pinning as torch does (on CPU: it raises, Megatron falls back to the legacy engine, as
        # without the launcher's dynamic-engine support); the dynamic-path scripts are unaffected.
        with warnings.catch_warnings(record=True) as caught, pinning_as_torch_does():
            warnings.simplefilter("always")
            original_init(self, *args, **kwargs)
        for w in caught:
            text = str(w.message)
            if FALLBACK_WARNING in text:
                reason = text.split(":", 1)[-1].rsplit(", using legacy", 1)[0].strip(" ,")
                megatron_lm.print_rank0(
                    "megatron-capaware: Megatron's StaticInferenceEngine runs the legacy static engine, "
                    f"not the dynamic one (it could not build it: {reason})"
                )
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    __init__.capaware_fallback_report = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


USAGE = f"""usage: {PROG} [-h] (SCRIPT.py | -m MODULE) [ARGS ...]

Run a Megatron-LM script (or module) with megatron-capaware's --moe-router-type
and --capaware-* flags added to its command line (see docs/megatron_lm.md).
ARGS go to the script unchanged; its own --help lists them all.
"""


def parse_launcher_args(argv: List[str]) -> argparse.Namespace:
    """``SCRIPT.py ARGS...`` or ``-m MODULE ARGS...``; the launcher's own options come first."""

    def fail(message: str) -> None:
        sys.stderr.write(USAGE.splitlines()[0] + f"\n{PROG}: error: {message}\n")
        raise SystemExit(2)

    if not argv:
        fail("give the Megatron-LM script to run: SCRIPT.py [ARGS ...]")
    if argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        raise SystemExit(0)
    if argv[0] == "-m":
        if len(argv) < 2:
            fail("-m needs a module name")
        return argparse.Namespace(module=argv[1], script=None, args=list(argv[2:]))
    if argv[0].startswith("-"):
        fail(f"unknown launcher option {argv[0]!r}: the script comes first, then its arguments")
    if not os.path.isfile(argv[0]):
        fail(f"script {argv[0]!r} does not exist")
    return argparse.Namespace(module=None, script=argv[0], args=list(argv[1:]))


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv, own_flags=False)


def _main(argv: List[str]) -> int:
    ns = parse_launcher_args(sys.argv[1:] if argv is None else list(argv))
    try:
        session = install_hooks()
    except megatron_lm.MegatronTrainingUnavailable as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    try:
        if ns.module is not None:
            sys.argv = [ns.module] + ns.args
            runpy.run_module(ns.module, run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(ns.script)
            sys.argv = [script] + ns.args
            sys.path.insert(0, os.path.dirname(script))
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise
    _finish_if_running(session)
    return 0


def _finish_if_running(session: LaunchSession) -> None:
    """A script that returns without destroying the process group still gets its report."""
    if not session.reported:
        session.finish()


if __name__ == "__main__":
    sys.exit(main())
