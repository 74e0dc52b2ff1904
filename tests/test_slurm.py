"""Slurm job scripts (scripts/slurm/): fast checks of the launcher, and real jobs on a local Slurm.

The ``slurm`` tests start a one-node Slurm cluster for this machine in a temp
directory (munged, slurmctld and slurmd as child processes of the test, all
pointed at a generated ``slurm.conf`` through ``SLURM_CONF``), submit
``scripts/slurm/ep_cpu.sbatch`` with ``sbatch`` exactly as ``docs/slurm.md``
writes it, and check the job's output and job folder. Slurm comes from
Debian's ``slurm-wlm`` and ``munge`` packages; when they are missing and we
are root, the test installs them with apt-get. The tests are skipped, with
the reason, only where Slurm cannot be installed or started here;
``CAPAWARE_REQUIRE_SLURM=1`` turns those skips into failures (for CI).
The daemons are always stopped by pid, and any process the jobs left behind
is found (by its ``SLURM_CONF``) and killed; ``CAPAWARE_KEEP_SLURM_DIR=1``
keeps the temp directory (config, daemon logs, job folders) for debugging.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "scripts" / "slurm"
LAUNCHER = SLURM_DIR / "launch_ep.sh"

# The command docs/slurm.md (and the README) give for a one-node CPU run; the
# slurm test submits exactly this line from a directory laid out like the
# repository root.
TESTED_SBATCH = "sbatch --nodes=1 scripts/slurm/ep_cpu.sbatch --procs-per-node 2 --ep 2 -- selfcheck"

SBIN_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
SLURM_TOOLS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun", "slurmctld", "slurmd", "slurmstepd")
MUNGE_TOOLS = ("munged", "munge", "unmunge")
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
}
JOB_TIMEOUT_S = 300.0


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text[-lines:])


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


# ---------------------------------------------------------------------------
# Fast checks: no Slurm needed (the launcher's --dry-run works anywhere).


def _launcher_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CAPAWARE_"))}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def _dry_run(args: Sequence[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCHER), "--dry-run", "--runs-dir", str(tmp_path / "runs"), *args],
        cwd=tmp_path, env=_launcher_env(**env), capture_output=True, text=True, timeout=60,
    )


def test_scripts_are_valid_bash_with_a_usage_header() -> None:
    scripts = sorted(SLURM_DIR.glob("*.sh")) + sorted(SLURM_DIR.glob("*.sbatch"))
    assert {p.name for p in scripts} >= {"launch_ep.sh", "ep_gpu.sbatch", "ep_cpu.sbatch"}
    for path in scripts:
        subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
        assert os.access(path, os.X_OK), f"{path.name} is not executable"
        header = "\n".join(path.read_text().splitlines()[:30])
        assert re.search(r"^# Usage\b", header, re.M), f"{path.name} has no usage header"
    gpu = (SLURM_DIR / "ep_gpu.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=" in gpu and "--device gpu" in gpu
    assert "--device cpu" in (SLURM_DIR / "ep_cpu.sbatch").read_text()
    help_text = subprocess.run(["bash", str(LAUNCHER), "--help"], capture_output=True, text=True, timeout=30)
    assert help_text.returncode == 0 and "Usage:" in help_text.stdout


def test_docs_and_readme_give_the_tested_sbatch_line() -> None:
    assert TESTED_SBATCH in (ROOT / "docs" / "slurm.md").read_text()
    readme = (ROOT / "README.md").read_text()
    if "scripts/slurm" in readme:  # once the README has its Slurm section
        assert TESTED_SBATCH in readme, "README's Slurm example is not the line tests/test_slurm.py submits"


def test_dry_run_gpu_two_nodes(tmp_path: Path) -> None:
    result = _dry_run(
        ["--device", "gpu", "--ep", "16", "--", "eval", "--max-tokens", "4096", "--csv", "@JOB_DIR@/eval.csv"], tmp_path,
        SLURM_JOB_ID="77", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-a,gpu-b",
        SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="64",
    )
    assert result.returncode == 0, result.stderr
    job_dir = tmp_path / "runs" / "77"
    command = (job_dir / "command.sh").read_text()
    for piece in ("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1",
                  "-m torch.distributed.run --nnodes=2 --nproc-per-node=8",
                  "--rdzv-backend=c10d --rdzv-endpoint=gpu-a:20077 --rdzv-id=77",
                  f"-m megatron_capaware.tools.evaluate --max-tokens 4096 --csv {job_dir}/eval.csv --ep 16 "
                  f"--json {job_dir}/eval.json --out {job_dir}/eval"):
        assert piece in command, (piece, command)
    env_txt = (job_dir / "env.txt").read_text()
    assert "layout: device=gpu procs_per_node=8 world=16 TP=1 EP=16 ETP=1" in env_txt
    assert "OMP_NUM_THREADS=8" in env_txt
    assert "CUDA_VISIBLE_DEVICES=\n" not in env_txt  # GPUs are not hidden on the GPU path
    assert "dry run" in (job_dir / "job.log").read_text()


def test_dry_run_cpu_static_module(tmp_path: Path) -> None:
    result = _dry_run(
        ["--device", "cpu", "--procs-per-node", "4", "--tp", "2", "--rdzv", "static", "--",
         "-m", "megatron_capaware.tools.selfcheck", "--ep", "4", "--tokens", "64"], tmp_path,
        SLURM_JOB_ID="5", SLURM_NNODES="2", SLURM_JOB_NODELIST="cpu1,cpu2", SLURM_CPUS_ON_NODE="16",
    )
    assert result.returncode == 0, result.stderr
    job_dir = tmp_path / "runs" / "5"
    command = (job_dir / "command.sh").read_text()
    assert "--node-rank=@NODE_RANK@ --master-addr=cpu1 --master-port=20005" in command
    # The command's own --ep is the layout; our own modules get the launcher's --tp added.
    assert command.rstrip().endswith("-u -m megatron_capaware.tools.selfcheck --ep 4 --tokens 64 --tp 2")
    env_txt = (job_dir / "env.txt").read_text()
    assert "layout: device=cpu procs_per_node=4 world=8 TP=2 EP=4 ETP=1" in env_txt
    assert "OMP_NUM_THREADS=4" in env_txt and "CUDA_VISIBLE_DEVICES=\n" in env_txt
    assert "CAPAWARE_EP=4" in env_txt and "CAPAWARE_TP=2" in env_txt


def test_dry_run_other_module_arguments_untouched(tmp_path: Path) -> None:
    result = _dry_run(["--device", "cpu", "--ep", "2", "--", "-m", "my_pkg.bench", "--steps", "3"], tmp_path,
                      SLURM_JOB_ID="6", SLURM_NNODES="1", SLURM_JOB_NODELIST="cpu1", SLURM_CPUS_ON_NODE="2")
    assert result.returncode == 0, result.stderr
    command = (tmp_path / "runs" / "6" / "command.sh").read_text()
    assert command.rstrip().endswith("-u -m my_pkg.bench --steps 3")  # sizes reach it as CAPAWARE_TP/EP/ETP


def test_dry_run_launch_runs_a_megatron_lm_script_through_the_routers_launcher(tmp_path: Path) -> None:
    """``launch SCRIPT.py``: Megatron's dynamic path (offline_inference.py) with Megatron's size flags added."""
    script = tmp_path / "examples" / "inference" / "offline_inference.py"
    script.parent.mkdir(parents=True)
    script.write_text("")
    result = _dry_run(["--device", "cpu", "--procs-per-node", "4", "--tp", "2", "--", "launch",
                       "examples/inference/offline_inference.py", "--load", "CKPT", "--use-coordinator",
                       "--moe-router-type", "capacity-drop"], tmp_path,
                      SLURM_JOB_ID="8", SLURM_NNODES="1", SLURM_JOB_NODELIST="cpu1", SLURM_CPUS_ON_NODE="4")
    assert result.returncode == 0, result.stderr
    job_dir = tmp_path / "runs" / "8"
    command = (job_dir / "command.sh").read_text()
    assert command.rstrip().endswith(
        "-u -m megatron_capaware.launch examples/inference/offline_inference.py --load CKPT --use-coordinator "
        "--moe-router-type capacity-drop --expert-model-parallel-size 2 --tensor-model-parallel-size 2 "
        f"--capaware-stats-output {job_dir}/stats.json"), command
    assert "layout: device=cpu procs_per_node=4 world=4 TP=2 EP=2 ETP=1" in (job_dir / "env.txt").read_text()
    # The script's own Megatron size flags are the layout; its own stats path is kept.
    result = _dry_run(["--device", "cpu", "--", "launch", "examples/inference/offline_inference.py",
                       "--expert-model-parallel-size", "2", "--capaware-stats-output", "s.json"], tmp_path,
                      SLURM_JOB_ID="9", SLURM_NNODES="1", SLURM_JOB_NODELIST="cpu1", SLURM_CPUS_ON_NODE="4")
    assert result.returncode == 0, result.stderr
    command = (tmp_path / "runs" / "9" / "command.sh").read_text()
    assert command.rstrip().endswith("-u -m megatron_capaware.launch examples/inference/offline_inference.py "
                                     "--expert-model-parallel-size 2 --capaware-stats-output s.json"), command
    for args, message in [
        (["--ep", "2", "--", "launch", "examples/inference/offline_inference.py", "--expert-model-parallel-size",
          "4"], "the command says --expert-model-parallel-size 4 but the launcher was given --ep 2"),
        (["--", "launch"], "launch needs the Megatron-LM script: launch SCRIPT.py [ARGS]"),
        (["--", "launch", "missing.py"], "script 'missing.py' not found"),
    ]:
        refused = _dry_run(["--device", "cpu", *args], tmp_path, SLURM_JOB_ID="10", SLURM_NNODES="1",
                           SLURM_JOB_NODELIST="cpu1", SLURM_CPUS_ON_NODE="4")
        assert refused.returncode == 2 and message in refused.stderr, (args, refused.stderr)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--ep", "3", "--", "selfcheck"], {}, "not divisible by EP x ETP = 3 x 1 = 3"),
        (["--procs-per-node", "3", "--tp", "2", "--", "selfcheck"], {}, "is not divisible by TP=2"),
        (["--ep", "2", "--", "-m", "megatron_capaware.tools.selfcheck", "--ep", "4"], {},
         "the command says --ep 4 but the launcher was given --ep 2"),
        (["--tp", "0", "--", "selfcheck"], {}, "--tp must be a positive integer"),
        (["--device", "gpu", "--", "selfcheck"], {}, "this allocation has no GPUs"),
        (["--device", "gpu", "--procs-per-node", "8", "--", "selfcheck"], {"SLURM_GPUS_ON_NODE": "4"},
         "--procs-per-node 8 > 4 GPUs per node"),
        (["--rdzv", "etcd", "--", "selfcheck"], {}, "--rdzv must be c10d or static"),
        (["--"], {}, "no command given"),
        (["--", "train"], {}, "unknown command 'train'"),
        (["--", "missing.py"], {}, "script 'missing.py' not found"),
        (["--ep"], {}, "option --ep needs a value"),
        (["--python", "/nonexistent/python", "--", "selfcheck"], {}, "not found"),
    ],
)
def test_dry_run_rejects_bad_layouts(tmp_path: Path, args: List[str], env: Dict[str, str], message: str) -> None:
    base = {"SLURM_JOB_ID": "9", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_CPUS_ON_NODE": "2"}
    result = _dry_run(["--device", "cpu", *args] if "--device" not in args else args, tmp_path, **{**base, **env})
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "runs" / "9").exists(), "a rejected launch must not create a job folder"


def test_outside_slurm_without_dry_run_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(LAUNCHER), "selfcheck"], cwd=tmp_path, env=_launcher_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not inside a Slurm allocation" in result.stderr


# ---------------------------------------------------------------------------
# A local one-node Slurm cluster.


class SlurmUnavailable(Exception):
    """Slurm cannot be installed or started on this machine (the reason is the message)."""


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CAPAWARE_REQUIRE_SLURM") == "1":
        pytest.fail(f"CAPAWARE_REQUIRE_SLURM=1 but: {reason}", pytrace=False)
    pytest.skip(reason)


def ensure_slurm_installed() -> None:
    """Install slurm-wlm and munge with apt-get when missing (root only)."""
    missing = [t for t in SLURM_TOOLS + MUNGE_TOOLS if _which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and we are not root to apt-get it")
    apt = _which("apt-get")
    if apt is None:
        raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=120"]
    keep_conf = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
    install = [apt, "install", "-y", "-qq", *lock, *keep_conf, "slurm-wlm", "munge"]
    log: List[str] = []

    def apt_run(cmd: List[str]) -> bool:
        try:
            result = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            log.append(f"$ {' '.join(cmd)}: timed out after 300 s")
            return False
        log.append(f"$ {' '.join(cmd)} -> exit {result.returncode}\n{(result.stdout + result.stderr)[-1200:]}")
        return result.returncode == 0

    # The package lists may already be there; refresh them only if the install fails.
    if not apt_run(install) and not (apt_run([apt, "update", "-qq", *lock]) and apt_run(install)):
        raise SlurmUnavailable("apt-get could not install slurm-wlm munge:\n" + "\n".join(log))
    missing = [t for t in SLURM_TOOLS + MUNGE_TOOLS if _which(t) is None]
    if missing:
        raise SlurmUnavailable(f"after apt-get install, still missing: {', '.join(missing)}")


def _free_ports(count: int) -> List[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGTERM if the test process dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; teardown kills by pid anyway
        pass


class LocalSlurm:
    """munged + slurmctld + slurmd for this one node, config and state under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.conf = base / "etc" / "slurm.conf"
        self.log_dir = base / "log"
        self.run_dir = base / "run"
        self.munge_socket = self.run_dir / "munge.sock"
        self.procs: Dict[str, subprocess.Popen] = {}
        self.node = ""
        self.cpus = 1
        self.user = ""

    # -- environment for clients and jobs --------------------------------
    def env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "CAPAWARE_"))}
        env.pop("OMP_NUM_THREADS", None)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env["SLURM_CONF"] = str(self.conf)
        # The jobs' `python` is this interpreter's (the test venv).
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:{SBIN_PATH}"
        env["CAPAWARE_COLLECTIVE_TIMEOUT_S"] = "120"  # a stuck collective fails before the job wait does
        return env

    def run(self, *args: str, timeout: float = 30, check: bool = False, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout, check=check, **kw)

    def logs(self) -> str:
        parts = []
        for daemon in ("munged", "slurmctld", "slurmd"):
            for name in (f"{daemon}.log", f"{daemon}.stdout"):  # munged --foreground logs to stderr
                path = self.log_dir / name
                if path.exists() and path.stat().st_size:
                    parts.append(f"--- {name} (last lines) ---\n{_tail(path, 15)}")
        return "\n".join(parts)

    # -- start -----------------------------------------------------------
    def _spawn(self, name: str, args: List[str]) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}.stdout", "wb")
        try:
            # cwd in our directory: slurmstepd inherits it, and that is how a leftover one is
            # recognised (it overwrites its environment with its process title).
            proc = subprocess.Popen(
                args, env=self.env(), cwd=self.run_dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        finally:
            out.close()
        self.procs[name] = proc
        return proc

    def _wait(self, what: str, ready, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SlurmUnavailable(
                    f"{what}: {Path(proc.args[0]).name} exited with code {proc.returncode}\n"
                    f"{_tail(self.log_dir / (Path(proc.args[0]).name + '.stdout'), 10)}\n{self.logs()}"
                )
            try:
                if ready():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.5)
        raise SlurmUnavailable(f"{what}: not ready after {timeout:.0f} s\n{self.logs()}")

    def start(self) -> None:
        for d in (self.base / "etc", self.log_dir, self.run_dir, self.base / "munge", self.base / "state",
                  self.base / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        os.chmod(self.run_dir, 0o755)  # munged: the socket's directory must be searchable by all
        os.chmod(self.base / "munge", 0o700)
        self.user = __import__("pwd").getpwuid(os.getuid()).pw_name

        key = self.base / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", [
            _which("munged"), "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--log-file={self.log_dir / 'munged.log'}", f"--pid-file={self.run_dir / 'munged.pid'}",
            f"--seed-file={self.base / 'munge' / 'munged.seed'}",
        ])

        def munge_ok() -> bool:
            if not self.munge_socket.exists():
                return False
            cred = self.run(_which("munge"), "-n", "-S", str(self.munge_socket), timeout=10)
            if cred.returncode != 0:
                return False
            return self.run(_which("unmunge"), "-S", str(self.munge_socket), input=cred.stdout, timeout=10).returncode == 0

        self._wait("munged", munge_ok, self.procs["munged"], 30)

        # This node as slurmd sees it (name, CPUs, sockets, memory): the config must match.
        probe = self.run(_which("slurmd"), "-C", timeout=30)
        line = probe.stdout.splitlines()[0] if probe.returncode == 0 and probe.stdout else ""
        match = re.match(r"NodeName=(\S+)", line)
        if not match:
            raise SlurmUnavailable(f"slurmd -C failed ({probe.returncode}): {probe.stdout}{probe.stderr}")
        self.node = match.group(1)
        self.cpus = int(re.search(r"CPUs=(\d+)", line).group(1))
        ctld_port, slurmd_port = _free_ports(2)
        (self.base / "etc" / "plugstack.conf").write_text("")
        b = self.base
        self.conf.write_text(f"""\
# One-node Slurm for tests/test_slurm.py (generated).
ClusterName=capawaretest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser={self.user}
SlurmdUser={self.user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={b / 'state'}
SlurmdSpoolDir={b / 'spool'}
SlurmctldPidFile={self.run_dir / 'slurmctld.pid'}
SlurmdPidFile={self.run_dir / 'slurmd.pid'}
SlurmctldLogFile={self.log_dir / 'slurmctld.log'}
SlurmdLogFile={self.log_dir / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={b / 'etc' / 'plugstack.conf'}
# No cgroups in a container: track job processes through /proc, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.log_dir / 'jobcomp.txt'}
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
{line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn("slurmctld", [_which("slurmctld"), "-D"])
        self._wait("slurmctld", lambda: self.run(_which("scontrol"), "ping", timeout=10).stdout.find("UP") >= 0,
                   self.procs["slurmctld"], 60)
        self._spawn("slurmd", [_which("slurmd"), "-D"])

        def node_idle() -> bool:
            out = self.run(_which("sinfo"), "-h", "-N", "-o", "%N %T", timeout=10).stdout.split()
            return len(out) == 2 and out[1] == "idle"

        try:
            self._wait("slurmd", node_idle, self.procs["slurmd"], 90)
        except SlurmUnavailable as exc:
            node = self.run(_which("scontrol"), "show", "node", self.node, timeout=10).stdout
            raise SlurmUnavailable(f"{exc}\n--- scontrol show node ---\n{node}") from None

    # -- jobs ------------------------------------------------------------
    def submit(self, command: str, cwd: Path) -> int:
        result = self.run(*shlex.split(command), cwd=cwd, timeout=60)
        match = re.search(r"Submitted batch job (\d+)", result.stdout)
        assert result.returncode == 0 and match, f"{command!r} -> {result.returncode}\n{result.stdout}{result.stderr}"
        return int(match.group(1))

    def job_fields(self, job_id: int) -> Dict[str, str]:
        out = self.run(_which("scontrol"), "show", "job", "-o", str(job_id), timeout=20).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, timeout: float = JOB_TIMEOUT_S) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        fields: Dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                fields = self.job_fields(job_id)
            except subprocess.TimeoutExpired:
                fields = {}
            if fields.get("JobState") in TERMINAL_STATES:
                return fields
            time.sleep(1.0)
        self.run(_which("scancel"), str(job_id), timeout=20)
        raise AssertionError(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f} s: cancelled\n{self.logs()}")

    def job_pids(self, job_id: int) -> List[int]:
        """Processes (other than the daemons) that carry this job's id in their environment."""
        return [pid for pid, env in _proc_environs() if f"SLURM_JOB_ID={job_id}".encode() in env.split(b"\0")]

    def wait_job_processes_gone(self, job_id: int, timeout: float = 60) -> List[int]:
        deadline = time.monotonic() + timeout
        while True:
            pids = self.job_pids(job_id)
            if not pids or time.monotonic() > deadline:
                return pids
            time.sleep(0.5)

    # -- stop ------------------------------------------------------------
    def stop(self) -> List[str]:
        """Cancel jobs, stop the daemons by pid, kill leftovers; returns what could not be killed."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                jobs = self.run(_which("squeue"), "-h", "-o", "%i", timeout=15).stdout.split()
                if jobs:
                    self.run(_which("scancel"), *jobs, timeout=15)
                    deadline = time.monotonic() + 45
                    while time.monotonic() < deadline and self.run(_which("squeue"), "-h", timeout=15).stdout.strip():
                        time.sleep(1)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        # Anything still belonging to this cluster (slurmstepd, job processes).
        return _kill_all(_pids_of(self.base))


def _pids_of(base: Path) -> List[int]:
    """Processes of the cluster under ``base``: its SLURM_CONF in their environment, ``base`` in
    their command line, or their working directory under ``base`` (slurmstepd)."""
    marker = f"SLURM_CONF={base / 'etc' / 'slurm.conf'}".encode()
    pids = {pid for pid, env in _proc_environs() if marker in env.split(b"\0")}
    pids.update(_pids_with_cmdline(str(base)))
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != me:
            try:
                cwd = os.readlink(f"/proc/{entry.name}/cwd")
            except OSError:
                continue
            if cwd == str(base) or cwd.startswith(f"{base}/"):
                pids.add(int(entry.name))
    return sorted(pid for pid in pids if _alive(pid))


def _kill_all(pids: List[int]) -> List[str]:
    """SIGKILL these pids; returns the ones still alive after 10 s."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    survivors = pids
    while survivors and time.monotonic() < deadline:
        time.sleep(0.2)
        survivors = [pid for pid in survivors if _alive(pid)]
    return [f"{pid}: {_cmdline(pid)}" for pid in survivors]


def _reap_stale_clusters() -> None:
    """Kill what a test run that died without its teardown (SIGKILL) left, and remove its directory."""
    for base in Path("/tmp").glob("capaware-slurm-*"):
        try:
            owner = int((base / "owner.pid").read_text())
        except (OSError, ValueError):
            owner = None
        if owner is not None and _alive(owner):
            continue  # another test session's cluster, still running
        try:
            if owner is None and time.time() - base.stat().st_mtime < 10:
                continue  # being created right now
        except OSError:
            continue
        _kill_all(_pids_of(base))
        shutil.rmtree(base, ignore_errors=True)


def _proc_environs():
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                yield int(entry.name), f.read()
        except OSError:
            continue


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _pids_with_cmdline(needle: str) -> List[int]:
    me = os.getpid()
    return [int(e.name) for e in os.scandir("/proc")
            if e.name.isdigit() and int(e.name) != me and needle in _cmdline(int(e.name))]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # zombies are gone for our purpose
    except OSError:
        return False


@pytest.fixture(scope="module")
def slurm() -> LocalSlurm:
    try:
        ensure_slurm_installed()
    except SlurmUnavailable as exc:
        _skip_or_fail(str(exc))
    _reap_stale_clusters()
    # Short path: munged's socket path must stay under the 108-byte limit.
    base = Path(tempfile.mkdtemp(prefix="capaware-slurm-", dir="/tmp"))
    (base / "owner.pid").write_text(str(os.getpid()))
    cluster = LocalSlurm(base)
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        survivors = cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
        assert not survivors, f"could not stop: {survivors}"
        _skip_or_fail(f"Slurm did not start here: {exc}")
    except BaseException:
        cluster.stop()
        raise
    # A SIGTERM (CI cancelling the run) becomes KeyboardInterrupt, so this teardown still runs.
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield cluster
    finally:
        signal.signal(signal.SIGTERM, previous)
        survivors = cluster.stop()
        if os.environ.get("CAPAWARE_KEEP_SLURM_DIR") != "1":
            shutil.rmtree(base, ignore_errors=True)
        assert not survivors, f"processes left after stopping the local Slurm: {survivors}"


@pytest.fixture()
def submit_dir(slurm: LocalSlurm, request) -> Path:
    """A directory laid out like the repository root (scripts/ linked), for relative sbatch lines."""
    path = slurm.base / "submit" / request.node.name.replace("[", "_").replace("]", "")
    path.mkdir(parents=True)
    (path / "scripts").symlink_to(ROOT / "scripts")
    return path


def _job_report(slurm: LocalSlurm, job_id: int, cwd: Path) -> str:
    job_log = cwd / "runs" / "slurm" / str(job_id) / "job.log"
    return (f"--- slurm-{job_id}.out ---\n{_tail(cwd / f'slurm-{job_id}.out', 40)}\n"
            f"--- job.log ---\n{_tail(job_log, 20)}\n{slurm.logs()}")


# ---------------------------------------------------------------------------
# Real jobs.


@pytest.mark.slurm
@pytest.mark.timeout(1200)
def test_selfcheck_job_as_documented(slurm: LocalSlurm, submit_dir: Path) -> None:
    """The documented one-node CPU line: EP=2 selfcheck through sbatch, srun, torchrun."""
    job_id = slurm.submit(TESTED_SBATCH, submit_dir)
    fields = slurm.wait_job(job_id)
    report = _job_report(slurm, job_id, submit_dir)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}\n{report}"

    slurm_out = (submit_dir / f"slurm-{job_id}.out").read_text()
    assert "selfcheck: OK" in slurm_out, report
    job_dir = submit_dir / "runs" / "slurm" / str(job_id)
    assert sorted(p.name for p in job_dir.iterdir()) == ["command.sh", "env.txt", "job.json", "job.log", "launch_ep.sh", "ranks"]
    assert "selfcheck: OK" in (job_dir / "job.log").read_text()
    assert sorted(p.name for p in (job_dir / "ranks").iterdir()) == ["rank-0.log", "rank-1.log"]
    assert "selfcheck: OK" in (job_dir / "ranks" / "rank-0.log").read_text()
    assert "# rank 1/2 local_rank 1" in (job_dir / "ranks" / "rank-1.log").read_text()

    command = (job_dir / "command.sh").read_text()
    assert (f"--nnodes=1 --nproc-per-node=2 --max-restarts=0 --rdzv-backend=c10d "
            f"--rdzv-endpoint={slurm.node}:{20000 + job_id % 20000} --rdzv-id={job_id}") in command
    assert command.rstrip().endswith("-u -m megatron_capaware.tools.selfcheck --ep 2")
    env_txt = (job_dir / "env.txt").read_text()
    assert "layout: device=cpu procs_per_node=2 world=2 TP=1 EP=2 ETP=1" in env_txt
    assert f"OMP_NUM_THREADS={max(1, slurm.cpus // 2)}" in env_txt
    assert f"SLURM_JOB_ID={job_id}" in env_txt and "megatron-core:" in env_txt
    info = json.loads((job_dir / "job.json").read_text())
    assert info["exit_code"] == 0 and info["world_size"] == 2 and info["ep"] == 2 and info["device"] == "cpu"
    assert f"JobId={job_id} " in (slurm.log_dir / "jobcomp.txt").read_text()

    assert slurm.wait_job_processes_gone(job_id) == [], "the job left processes behind"


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_bad_layout_fails_fast(slurm: LocalSlurm, submit_dir: Path) -> None:
    """EP=3 does not tile 2 ranks: the job stops before srun with exit code 2 and says why."""
    job_id = slurm.submit("sbatch --nodes=1 scripts/slurm/ep_cpu.sbatch --procs-per-node 2 --ep 3 -- selfcheck",
                          submit_dir)
    fields = slurm.wait_job(job_id, timeout=120)
    report = _job_report(slurm, job_id, submit_dir)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", f"{fields}\n{report}"
    assert "world size 2 (1 node(s) x 2 procs per node) is not divisible by EP x ETP = 3 x 1 = 3" in report
    assert not (submit_dir / "runs" / "slurm" / str(job_id)).exists()


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_failing_rank_fails_the_job_and_leaves_nothing(slurm: LocalSlurm, submit_dir: Path) -> None:
    """Rank 1 exits 3: torchrun stops rank 0, the job fails, the job log shows rank 1's tail (static rendezvous)."""
    (submit_dir / "fail_rank1.py").write_text(
        "import os, sys, time\n"
        "rank = int(os.environ['RANK'])\n"
        "print(f'hello from rank {rank}', flush=True)\n"
        "if rank == 1:\n"
        "    print('rank 1 fails on purpose', file=sys.stderr, flush=True)\n"
        "    sys.exit(3)\n"
        "time.sleep(600)\n"
    )
    job_id = slurm.submit("sbatch --nodes=1 scripts/slurm/ep_cpu.sbatch --rdzv static -- fail_rank1.py", submit_dir)
    fields = slurm.wait_job(job_id, timeout=180)
    report = _job_report(slurm, job_id, submit_dir)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", f"{fields}\n{report}"
    job_dir = submit_dir / "runs" / "slurm" / str(job_id)
    job_log = (job_dir / "job.log").read_text()
    assert "[rank 1] exited with code 3" in job_log and "[rank 1] rank 1 fails on purpose" in job_log, report
    assert (job_dir / "ranks" / "rank-1.log").exists()  # rank 0 may be stopped before it prints anything
    assert "--node-rank=@NODE_RANK@" in (job_dir / "command.sh").read_text()
    info = json.loads((job_dir / "job.json").read_text())
    assert info["exit_code"] != 0 and info["ok"] is False
    assert slurm.wait_job_processes_gone(job_id) == [], "the failed job left processes behind"


@pytest.mark.slurm
@pytest.mark.timeout(1200)
def test_launch_runs_megatrons_dynamic_path_as_a_job(slurm: LocalSlurm, monkeypatch: pytest.MonkeyPatch) -> None:
    """``launch examples/inference/offline_inference.py`` at EP 2 through sbatch, srun and torchrun.

    Needs a Megatron-LM clone with ``core_v0.19.0`` in ``MEGATRON_LM_DIR`` and Megatron-LM's
    requirements of the script (skipped, saying which, otherwise).
    """
    import importlib.util

    clone = os.environ.get("MEGATRON_LM_DIR")
    if not clone:
        pytest.skip("MEGATRON_LM_DIR is not set: point it at a Megatron-LM clone to run its scripts as a job")
    missing = [m for m in ("pybind11", "simpy", "zmq", "msgpack") if importlib.util.find_spec(m) is None]
    if missing or importlib.util.find_spec("megatron.core.inference.apis") is None:
        pytest.skip(f"offline_inference.py needs megatron-core >= 0.19 and {' '.join(missing) or 'nothing else'}")
    tree = slurm.base / "megatron-lm"
    tree.mkdir()
    archive = subprocess.Popen(["git", "-C", clone, "archive", "core_v0.19.0", "megatron", "examples", "tools"],
                               stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        pytest.skip(f"MEGATRON_LM_DIR={clone} has no core_v0.19.0 (git fetch --tags there)")
    (tree / "scripts").symlink_to(ROOT / "scripts")
    from megatron_capaware.models.reference_models import reference_model_dir

    ckpt = reference_model_dir()
    monkeypatch.setenv("PYTHONPATH", f"{tree}{os.pathsep}{ROOT}")  # the checkout first, as docs/slurm.md says
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    job_id = slurm.submit(
        "sbatch --nodes=1 scripts/slurm/ep_cpu.sbatch --procs-per-node 2 --ep 2 -- launch "
        f"examples/inference/offline_inference.py --load {ckpt} --use-coordinator --moe-token-dispatcher-type alltoall "
        "--micro-batch-size 1 --inference-dynamic-batching-buffer-size-gb 0.05 --inference-dynamic-batching-block-size 16 "
        "--inference-dynamic-batching-max-requests 4 --moe-router-type capacity-drop --capaware-gamma 1.0 "
        f"--capaware-placement {ckpt / 'placement-ep2-r2.json'} --prompts ROMEO: --num-tokens-to-generate 8", tree)
    fields = slurm.wait_job(job_id, timeout=900)
    report = _job_report(slurm, job_id, tree)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}\n{report}"
    job_dir = tree / "runs" / "slurm" / str(job_id)
    log = (job_dir / "job.log").read_text()
    assert re.search(r"^1/1\[n 1, l \d+\] ROMEO:\n\s+>>>> \[n 1, 8 tokens", log, re.M), log[-3000:]
    assert "megatron-capaware load stats: router capacity-drop(gamma=1), EP=2, 4 MoE layers" in log, log[-3000:]
    stats = json.loads((job_dir / "stats.json").read_text())
    assert stats["expert_parallel"] == 2 and stats["router"] == "capacity-drop(gamma=1)"
    command = (job_dir / "command.sh").read_text()
    assert "-u -m megatron_capaware.launch examples/inference/offline_inference.py" in command
    assert f"--expert-model-parallel-size 2 --capaware-stats-output {job_dir}/stats.json" in command
    # The coordinator process the ranks spawned is gone with them.
    assert slurm.wait_job_processes_gone(job_id) == [], "the job left processes behind"
