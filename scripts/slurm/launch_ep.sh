#!/usr/bin/env bash
# launch_ep.sh - run a megatron-capaware command over a Slurm allocation with
# expert parallelism: one `srun` task per node, each starting `torchrun`, which
# starts the ranks of that node. Called by ep_gpu.sbatch / ep_cpu.sbatch (or
# directly inside `salloc`).
#
# Usage:
#   launch_ep.sh [OPTIONS] [--] COMMAND [ARGS...]
#
# COMMAND (what every rank runs):
#   selfcheck [ARGS]    python -m megatron_capaware.tools.selfcheck, with --ep (and
#                       --tp/--etp when > 1) added from the options below
#   eval [ARGS]         python -m megatron_capaware.tools.evaluate (capaware-eval), same
#                       sizes added, plus --json JOB_DIR/eval.json and
#                       --out JOB_DIR/eval unless ARGS gives them
#   launch SCRIPT.py [ARGS]
#                       a Megatron-LM script through the routers' launcher
#                       (python -m megatron_capaware.launch SCRIPT.py), e.g.
#                       Megatron's dynamic path examples/inference/offline_inference.py
#                       (MegatronLLM); --expert-model-parallel-size (and
#                       --tensor-model-parallel-size / --expert-tensor-parallel-size
#                       when > 1) added from the options below, plus
#                       --capaware-stats-output JOB_DIR/stats.json unless ARGS
#                       gives them. The Megatron-LM checkout must be on PYTHONPATH.
#   -m MODULE [ARGS]    any Python module, arguments passed as given
#   SCRIPT.py [ARGS]    any Python script, arguments passed as given
# In ARGS, @JOB_DIR@ is replaced by the job folder (e.g. --stats @JOB_DIR@/s.json).
#
# OPTIONS (each also read from the environment variable in brackets; an
# option given on the command line wins):
#   --device gpu|cpu     [CAPAWARE_DEVICE] gpu: one rank per GPU, nccl.
#                        cpu: GPUs hidden, gloo. Default: gpu if the
#                        allocation has GPUs, else cpu.
#   --procs-per-node N   [CAPAWARE_PROCS_PER_NODE] ranks per node. Default:
#                        gpu: the GPUs per node; cpu: 2.
#   --tp N               [CAPAWARE_TP]  tensor parallel size (default 1)
#   --ep N               [CAPAWARE_EP]  expert parallel size (default: world / TP)
#   --etp N              [CAPAWARE_ETP] expert tensor parallel size (default 1)
#   --runs-dir DIR       [CAPAWARE_RUNS_DIR] job folders go to DIR/JOB_ID
#                        (default: $SLURM_SUBMIT_DIR/runs/slurm)
#   --rdzv c10d|static   [CAPAWARE_RDZV] torchrun rendezvous (default c10d):
#                        c10d: --rdzv-backend=c10d --rdzv-id=JOB_ID;
#                        static: --node-rank=$SLURM_NODEID --master-addr/port
#   --master-addr HOST   [CAPAWARE_MASTER_ADDR] rendezvous host (default: the
#                        first node of `scontrol show hostnames $SLURM_JOB_NODELIST`)
#   --port N             [CAPAWARE_PORT] rendezvous port (default 20000 + JOB_ID % 20000)
#   --python PATH        [CAPAWARE_PYTHON] interpreter (default: python, else python3,
#                        from PATH, resolved on the first node; the same path on all nodes)
#   --dry-run            validate, write the job folder and print the commands,
#                        but do not run srun (works outside Slurm too)
#   -h, --help           this text
# Other environment: CAPAWARE_SRUN_ARGS / CAPAWARE_TORCHRUN_ARGS (extra
# arguments, split on spaces), CAPAWARE_CONSOLE_RANKS (0 = only rank 0 in the
# job log, the default; all = every rank, prefixed "[rank R]"),
# OMP_NUM_THREADS (default: CPUs per node / ranks per node).
#
# The layout must tile the world: W = nodes x procs-per-node must be divisible
# by TP and by EP x ETP (Megatron's rule); the launcher stops before srun, with
# exit code 2 and a message, when it does not, when an --ep/--tp/--etp in ARGS
# disagrees with the options, or when --device gpu has fewer GPUs than ranks.
#
# Job folder ($RUNS_DIR/$SLURM_JOB_ID/):
#   job.log         everything this launcher and rank 0 printed (plus the
#                   tail of any other rank that failed)
#   command.sh      the srun / torchrun / rank command lines, as run
#   env.txt         environment summary: Slurm variables, layout, versions
#   ranks/rank-R.log  stdout+stderr of global rank R
#   job.json        layout, command, exit code, start/end times
#   launch_ep.sh    the copy of this launcher the nodes and ranks ran
#   eval.json, eval/  (eval) the evaluation's --json and --out outputs
#   stats.json      (launch) the routers' per-layer load statistics
# The job's exit code is that of the run (0 only if every rank exited 0).

set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

die() { echo "launch_ep.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$SELF"; }

# ---------------------------------------------------------------------------
# Internal mode, one per rank (torchrun --no-python runs this): log the rank's
# output to ranks/rank-R.log; rank 0 (or every rank) also to the job log.
rank_main() {
  set +e
  log="$CAPAWARE_JOB_DIR/ranks/rank-${RANK}.log"
  echo "# rank $RANK/$WORLD_SIZE local_rank $LOCAL_RANK node $(hostname) $(date -Is): $*" >"$log"
  if [[ "${CAPAWARE_CONSOLE_RANKS:-0}" == all ]]; then
    "$@" 2>&1 | tee -a "$log" | sed -u "s/^/[rank $RANK] /"
    rc=${PIPESTATUS[0]}
  elif [[ "$RANK" == 0 ]]; then
    "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
  else
    "$@" >>"$log" 2>&1
    rc=$?
    if [[ $rc != 0 ]]; then
      { echo "[rank $RANK] exited with code $rc on $(hostname); last lines of $log:"
        tail -n 30 "$log" | sed "s/^/[rank $RANK] /"; } >&2
    fi
  fi
  return "$rc"
}

# Internal mode, one per node (srun runs this): torchrun with this node's rank.
node_main() {
  local a args=()
  for a in "$@"; do args+=("${a//@NODE_RANK@/${SLURM_NODEID:?}}"); done
  exec "${args[@]}"
}

# ---------------------------------------------------------------------------
# The launcher proper (runs once, in the batch script). Everything is inside
# functions so that bash has parsed the whole file before running any of it:
# editing this file while jobs run cannot change a running job.
main() {

# Options.
device="${CAPAWARE_DEVICE:-}"
ppn="${CAPAWARE_PROCS_PER_NODE:-}"
tp="${CAPAWARE_TP:-}"
ep="${CAPAWARE_EP:-}"
etp="${CAPAWARE_ETP:-}"
runs_dir="${CAPAWARE_RUNS_DIR:-}"
rdzv="${CAPAWARE_RDZV:-c10d}"
master_addr="${CAPAWARE_MASTER_ADDR:-}"
port="${CAPAWARE_PORT:-}"
python="${CAPAWARE_PYTHON:-}"
dry_run=0

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) need_value "$@"; device="$2"; shift 2 ;;
    --procs-per-node|--nproc-per-node|--nproc_per_node) need_value "$@"; ppn="$2"; shift 2 ;;
    --tp) need_value "$@"; tp="$2"; shift 2 ;;
    --ep) need_value "$@"; ep="$2"; shift 2 ;;
    --etp) need_value "$@"; etp="$2"; shift 2 ;;
    --runs-dir) need_value "$@"; runs_dir="$2"; shift 2 ;;
    --rdzv) need_value "$@"; rdzv="$2"; shift 2 ;;
    --master-addr) need_value "$@"; master_addr="$2"; shift 2 ;;
    --port) need_value "$@"; port="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -m) break ;;
    -*) die "unknown option '$1' (launcher options go before the command; see --help)" ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || die "no command given: use 'selfcheck', 'eval', 'launch SCRIPT.py', '-m MODULE' or 'SCRIPT.py' after the options (see --help)"

is_pos_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
check_int() { is_pos_int "$2" || die "$1 must be a positive integer, got '$2'"; }

# ---------------------------------------------------------------------------
# Where we are: Slurm allocation (or a dry run outside one).
in_slurm=1
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  [[ $dry_run == 1 ]] || die "not inside a Slurm allocation (SLURM_JOB_ID unset): submit with sbatch scripts/slurm/ep_gpu.sbatch ... or run inside salloc; --dry-run works anywhere"
  in_slurm=0
fi
job_id="${SLURM_JOB_ID:-dryrun-$$}"
nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
check_int "the number of nodes (SLURM_NNODES)" "$nnodes"
submit_dir="${SLURM_SUBMIT_DIR:-$PWD}"

# Rendezvous host: first node of the allocation.
if [[ -z "$master_addr" ]]; then
  if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    if command -v scontrol >/dev/null; then
      master_addr="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1 || true)"
    fi
    if [[ -z "$master_addr" && "${SLURM_JOB_NODELIST%%,*}" != *"["* ]]; then
      master_addr="${SLURM_JOB_NODELIST%%,*}"  # plain "host1,host2" list: no scontrol needed
    fi
  elif [[ $in_slurm == 0 ]]; then
    master_addr="$(hostname)"
  fi
  [[ -n "$master_addr" ]] || die "could not find the first node of SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}' with 'scontrol show hostnames'; set --master-addr"
fi
if [[ -z "$port" ]]; then
  if [[ "$job_id" =~ ^[0-9]+$ ]]; then port=$((20000 + job_id % 20000)); else port=29500; fi
fi
check_int "--port" "$port"
(( port <= 65535 )) || die "--port must be <= 65535, got $port"
case "$rdzv" in c10d|static) ;; *) die "--rdzv must be c10d or static, got '$rdzv'" ;; esac

# CPUs of one node (the batch node; nodes are assumed alike).
cpus_per_node="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}"
cpus_per_node="${cpus_per_node%%(*}"  # "8(x2)" forms
is_pos_int "$cpus_per_node" || cpus_per_node="$(nproc)"

# GPUs of one node.
count_gpus() {
  local n="${SLURM_GPUS_ON_NODE:-}"
  if [[ -z "$n" && -n "${SLURM_GPUS_PER_NODE:-}" ]]; then n="${SLURM_GPUS_PER_NODE##*:}"; fi
  if [[ -z "$n" && -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != "-1" ]]; then
    n="$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)"
  fi
  if [[ -z "$n" ]] && command -v nvidia-smi >/dev/null; then n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"; fi
  is_pos_int "${n:-0}" && echo "$n" || echo 0
}
gpus="$(count_gpus)"
if [[ -z "$device" ]]; then
  if [[ "$gpus" -gt 0 ]]; then device=gpu; else device=cpu; fi
fi
case "$device" in
  gpu)
    [[ "$gpus" -gt 0 ]] || die "--device gpu but this allocation has no GPUs (SLURM_GPUS_ON_NODE/CUDA_VISIBLE_DEVICES unset, no nvidia-smi): submit ep_gpu.sbatch with --gpus-per-node=N, or use ep_cpu.sbatch"
    ppn="${ppn:-$gpus}"
    check_int "--procs-per-node" "$ppn"
    (( ppn <= gpus )) || die "--procs-per-node $ppn > $gpus GPUs per node: one rank per GPU"
    ;;
  cpu)
    ppn="${ppn:-2}"
    check_int "--procs-per-node" "$ppn"
    ;;
  *) die "--device must be gpu or cpu, got '$device'" ;;
esac
world=$((nnodes * ppn))

# ---------------------------------------------------------------------------
# The command, and the sizes it will run with.
cmd=("$@")
kind=other
case "${cmd[0]}" in
  selfcheck) kind=selfcheck; cmd=(-m megatron_capaware.tools.selfcheck "${cmd[@]:1}") ;;
  eval|capaware-eval) kind=eval; cmd=(-m megatron_capaware.tools.evaluate "${cmd[@]:1}") ;;
  launch)
    [[ ${#cmd[@]} -ge 2 && "${cmd[1]}" == *.py ]] || die "launch needs the Megatron-LM script: launch SCRIPT.py [ARGS] (e.g. launch examples/inference/offline_inference.py --load CKPT ...)"
    [[ -f "${cmd[1]}" ]] || die "script '${cmd[1]}' not found (from $PWD): give its path in the Megatron-LM checkout"
    kind=launch; cmd=(-m megatron_capaware.launch "${cmd[@]:1}") ;;
  -m) [[ ${#cmd[@]} -ge 2 ]] || die "-m needs a module name" ;;
  *.py) [[ -f "${cmd[0]}" ]] || die "script '${cmd[0]}' not found (from $PWD)" ;;
  *) die "unknown command '${cmd[0]}': use 'selfcheck', 'eval', 'launch SCRIPT.py', '-m MODULE' or 'SCRIPT.py'" ;;
esac
[[ "${cmd[0]}" != -m || "${cmd[1]}" != megatron_capaware.tools.selfcheck ]] || kind=selfcheck
[[ "${cmd[0]}" != -m || "${cmd[1]}" != megatron_capaware.tools.evaluate ]] || kind=eval
[[ "${cmd[0]}" != -m || "${cmd[1]}" != megatron_capaware.launch ]] || kind=launch

# --tp/--ep/--etp/--json already in the command's own arguments.
arg_value() {  # arg_value NAME: value of --NAME N / --NAME=N in cmd, or empty
  local i
  for ((i = 0; i < ${#cmd[@]}; i++)); do
    case "${cmd[i]}" in
      "--$1") echo "${cmd[i + 1]:-}"; return ;;
      "--$1="*) echo "${cmd[i]#--$1=}"; return ;;
    esac
  done
}
# Megatron's own names of the sizes (a launched Megatron-LM script takes these).
megatron_flag() {
  case "$1" in
    tp) echo tensor-model-parallel-size ;; ep) echo expert-model-parallel-size ;; etp) echo expert-tensor-parallel-size ;;
  esac
}
for name in tp ep etp; do
  if [[ $kind == launch ]]; then flag="$(megatron_flag "$name")"; else flag="$name"; fi
  given="$(arg_value "$flag")"
  [[ -n "$given" ]] || continue
  check_int "--$flag in the command" "$given"
  opt="${!name}"
  if [[ -n "$opt" && "$opt" != "$given" ]]; then
    die "the command says --$flag $given but the launcher was given --$name $opt (or CAPAWARE_${name^^}=$opt): give it once"
  fi
  printf -v "$name" '%s' "$given"
  eval "in_cmd_$name=1"
done
tp="${tp:-1}"; etp="${etp:-1}"
check_int "--tp" "$tp"; check_int "--etp" "$etp"
if [[ -z "$ep" ]]; then
  (( world % tp == 0 )) || die "world size $world ($nnodes node(s) x $ppn procs) is not divisible by TP=$tp"
  ep=$((world / tp))
fi
check_int "--ep" "$ep"
(( world % tp == 0 )) || die "world size $world ($nnodes node(s) x $ppn procs per node) is not divisible by TP=$tp"
(( world % (ep * etp) == 0 )) || die "world size $world ($nnodes node(s) x $ppn procs per node) is not divisible by EP x ETP = $ep x $etp = $((ep * etp)): launch a multiple of $((ep * etp)) ranks or change --ep/--etp"
if (( tp > ppn )); then
  echo "launch_ep.sh: warning: TP=$tp spans more than one node ($ppn procs per node): tensor parallel traffic will cross the network" >&2
fi

# Add the sizes to our own commands when the command does not give them.
if [[ $kind == selfcheck || $kind == eval ]]; then
  [[ -n "${in_cmd_ep:-}" ]] || cmd+=(--ep "$ep")
  [[ -n "${in_cmd_tp:-}" || "$tp" == 1 ]] || cmd+=(--tp "$tp")
  [[ -n "${in_cmd_etp:-}" || "$etp" == 1 ]] || cmd+=(--etp "$etp")
elif [[ $kind == launch ]]; then  # Megatron's flags
  [[ -n "${in_cmd_ep:-}" ]] || cmd+=(--expert-model-parallel-size "$ep")
  [[ -n "${in_cmd_tp:-}" || "$tp" == 1 ]] || cmd+=(--tensor-model-parallel-size "$tp")
  [[ -n "${in_cmd_etp:-}" || "$etp" == 1 ]] || cmd+=(--expert-tensor-parallel-size "$etp")
fi

# Interpreter, resolved here and used as the same path on every node.
if [[ -z "$python" ]]; then
  python="$(command -v python || command -v python3 || true)"
  [[ -n "$python" ]] || die "no python or python3 in PATH: activate the environment with megatron-capaware before sbatch, or set --python"
else
  given_python="$python"
  python="$(command -v "$python" || true)"
  [[ -n "$python" ]] || die "--python: '$given_python' not found"
fi
missing="$("$python" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("torch", "megatron.core", "megatron_capaware") if importlib.util.find_spec(m.split(".")[0]) is None or importlib.util.find_spec(m) is None))
EOF
)" || die "$python does not run"
[[ -z "$missing" ]] || die "$python cannot import: $missing (install megatron-capaware in that environment, or set --python)"

# ---------------------------------------------------------------------------
# Job folder and logs.
runs_dir="${runs_dir:-$submit_dir/runs/slurm}"
job_dir="$runs_dir/$job_id"
mkdir -p "$job_dir/ranks" || die "cannot create the job folder $job_dir"
job_dir="$(cd "$job_dir" && pwd)"
# The nodes and ranks run this copy: the job keeps one launcher version from
# start to end, and the folder records it.
step_launcher="$job_dir/launch_ep.sh"
cp "$SELF" "$step_launcher" || die "cannot copy the launcher to $job_dir"
for i in "${!cmd[@]}"; do cmd[i]="${cmd[i]//@JOB_DIR@/$job_dir}"; done
if [[ $kind == eval ]]; then  # the evaluation's outputs go to the job folder unless ARGS says otherwise
  [[ -n "$(arg_value json)" ]] || cmd+=(--json "$job_dir/eval.json")
  [[ -n "$(arg_value out)" ]] || cmd+=(--out "$job_dir/eval")
fi
if [[ $kind == launch ]]; then  # the load report goes to the job folder unless ARGS says otherwise
  [[ -n "$(arg_value capaware-stats-output)" ]] || cmd+=(--capaware-stats-output "$job_dir/stats.json")
fi

export CAPAWARE_JOB_DIR="$job_dir" CAPAWARE_TP="$tp" CAPAWARE_EP="$ep" CAPAWARE_ETP="$etp" PYTHONUNBUFFERED=1
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  threads=$((cpus_per_node / ppn)); (( threads >= 1 )) || threads=1
  export OMP_NUM_THREADS="$threads"
fi
if [[ $device == cpu ]]; then
  export CUDA_VISIBLE_DEVICES=""            # gloo, even on a GPU node
  export TORCHDYNAMO_DISABLE="${TORCHDYNAMO_DISABLE:-1}"  # Megatron's jit_fuser: ~17 s first-step compile on CPU
fi

torchrun=("$python" -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$ppn" --max-restarts=0)
if [[ $rdzv == c10d ]]; then
  torchrun+=(--rdzv-backend=c10d --rdzv-endpoint="$master_addr:$port" --rdzv-id="$job_id")
else
  torchrun+=(--node-rank=@NODE_RANK@ --master-addr="$master_addr" --master-port="$port")
fi
# shellcheck disable=SC2206
torchrun+=(${CAPAWARE_TORCHRUN_ARGS:-} --no-python bash "$step_launcher" __rank__ "$python" -u "${cmd[@]}")
# shellcheck disable=SC2206
srun_cmd=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 --mpi=none
          ${CAPAWARE_SRUN_ARGS:-} bash "$step_launcher" __node__ "${torchrun[@]}")

{
  echo "# megatron-capaware job $job_id: $(date -Is)"
  echo "# srun starts one task per node; each runs torchrun (@NODE_RANK@ = \$SLURM_NODEID),"
  echo "# which runs the rank command under launch_ep.sh __rank__ (per-rank logs)."
  echo "cd $(printf '%q' "$PWD")"
  printf '%q ' "${srun_cmd[@]}"; echo
} >"$job_dir/command.sh"

{
  echo "date: $(date -Is)"
  echo "job: id=$job_id name=${SLURM_JOB_NAME:-} partition=${SLURM_JOB_PARTITION:-} account=${SLURM_JOB_ACCOUNT:-}"
  echo "nodes: $nnodes (${SLURM_JOB_NODELIST:-$(hostname)}); batch host $(hostname)"
  echo "layout: device=$device procs_per_node=$ppn world=$world TP=$tp EP=$ep ETP=$etp"
  echo "rendezvous: $rdzv $master_addr:$port"
  echo "cpus_per_node=$cpus_per_node gpus_per_node=$gpus OMP_NUM_THREADS=$OMP_NUM_THREADS"
  echo "submit_dir: $submit_dir"
  echo "cwd: $PWD"
  echo "python: $python"
  "$python" - <<'EOF' 2>&1 || true
import importlib.metadata as md, platform
print("python_version:", platform.python_version())
for dist in ("torch", "megatron-core", "megatron-capaware"):
    try:
        print(f"{dist}: {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}: not installed")
EOF
  pkg_dir="$("$python" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("megatron_capaware").origin))' 2>/dev/null || true)"
  if [[ -n "$pkg_dir" ]] && git -C "$pkg_dir" rev-parse HEAD >/dev/null 2>&1; then
    echo "megatron-capaware git: $(git -C "$pkg_dir" rev-parse HEAD)$(git -C "$pkg_dir" diff --quiet HEAD -- 2>/dev/null || echo ' (modified)')"
  fi
  if [[ $device == gpu ]] && command -v nvidia-smi >/dev/null; then
    echo "nvidia-smi (batch host):"; nvidia-smi -L 2>&1 | sed 's/^/  /'
  fi
  echo "environment (SLURM_*, CAPAWARE_*, CUDA/NCCL/GLOO/TORCH/OMP):"
  env | grep -E '^(SLURM_|CAPAWARE_|CUDA_|NCCL_|GLOO_|TORCH|OMP_|MASTER_)' | sort | sed 's/^/  /' || true
} >"$job_dir/env.txt"

write_json() {  # write_json EXIT_CODE START_EPOCH END_EPOCH
  "$python" - "$job_dir/job.json" "$1" "$2" "$3" "$job_id" "$nnodes" "$ppn" "$world" "$tp" "$ep" "$etp" \
    "$device" "$rdzv" "$master_addr:$port" "$job_dir" "$python" "${cmd[@]}" <<'EOF'
import datetime, json, sys
(path, rc, start, end, job, nnodes, ppn, world, tp, ep, etp, device, rdzv, endpoint, job_dir, python), cmd = sys.argv[1:17], sys.argv[17:]
iso = lambda t: datetime.datetime.fromtimestamp(int(t)).astimezone().isoformat()
json.dump({
    "job_id": job, "exit_code": int(rc), "ok": int(rc) == 0,
    "start": iso(start), "end": iso(end), "elapsed_s": int(end) - int(start),
    "nodes": int(nnodes), "procs_per_node": int(ppn), "world_size": int(world),
    "tp": int(tp), "ep": int(ep), "etp": int(etp), "device": device,
    "rendezvous": {"backend": rdzv, "endpoint": endpoint},
    "command": [python, "-u", *cmd], "job_dir": job_dir,
}, open(path, "w"), indent=2)
EOF
}

run() {
  echo "launch_ep.sh: job $job_id: $nnodes node(s) x $ppn $device proc(s) = world $world, TP=$tp EP=$ep ETP=$etp"
  echo "launch_ep.sh: command: python -u ${cmd[*]}"
  echo "launch_ep.sh: rendezvous $rdzv at $master_addr:$port; OMP_NUM_THREADS=$OMP_NUM_THREADS; job folder $job_dir"
  if [[ $dry_run == 1 ]]; then
    echo "launch_ep.sh: dry run, not starting:"
    printf '%q ' "${srun_cmd[@]}"; echo
    return 0
  fi
  local start rc
  start="$(date +%s)"
  set +e
  "${srun_cmd[@]}"
  rc=$?
  set -e
  write_json "$rc" "$start" "$(date +%s)" || true
  if [[ $rc == 0 ]]; then
    echo "launch_ep.sh: job $job_id finished OK in $(( $(date +%s) - start )) s; logs in $job_dir"
  else
    echo "launch_ep.sh: job $job_id FAILED with exit code $rc after $(( $(date +%s) - start )) s; rank logs in $job_dir/ranks" >&2
  fi
  return "$rc"
}

set +e
run 2>&1 | tee -a "$job_dir/job.log"
rc=${PIPESTATUS[0]}
return "$rc"
}

case "${1:-}" in
  __rank__) shift; rank_main "$@" ;;
  __node__) shift; node_main "$@" ;;
  *) main "$@" ;;
esac
exit $?
