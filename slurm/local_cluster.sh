#!/usr/bin/env bash
# A throwaway SLURM cluster on this machine (munged + slurmctld + slurmd), for the tests and for
# trying the sbatch templates without a real cluster. Needs root and the Debian packages:
#   apt-get install -y --no-install-recommends slurmd slurmctld slurm-client munge
#
#   slurm/local_cluster.sh start [--state-dir DIR] [--emulated-nodes N]
#   slurm/local_cluster.sh stop  [--state-dir DIR]
#   slurm/local_cluster.sh env   [--state-dir DIR]     # prints `export SLURM_CONF=...`
#
# Everything (config, munge key and socket, spool, logs, PIDs) lives in the state directory, on
# free ports, so two clusters (or a system SLURM) can coexist. Partition `local` holds this host;
# partition `emulated` holds N extra nodes n1..nN, each one more slurmd on 127.0.0.1, which is how
# multi-node jobs are tested on one machine. `stop` kills only the PIDs that `start` recorded.
set -euo pipefail

state_dir="${ACCEL_SLURM_STATE:-/tmp/accel-slurm}"
emulated=0
command="${1:-}"
shift || true
while (($#)); do
  case "$1" in
    --state-dir) state_dir="$2"; shift 2 ;;
    --emulated-nodes) emulated="$2"; shift 2 ;;
    *) echo "local_cluster.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
state_dir="$(mkdir -p "$state_dir" && cd "$state_dir" && pwd)"
conf="$state_dir/slurm.conf"
pids="$state_dir/pids"   # lines "<command name> <pid>", written as each daemon starts

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

alive() {  # alive NAME PID: the PID is still the daemon we started (not a recycled PID)
  [[ -r "/proc/$2/comm" ]] && [[ "$(cat "/proc/$2/comm")" == "$1" ]]
}

# Start "$@" in its own session, log to $log, record its PID under $name. `setsid` and `setpriv`
# exec rather than fork (we are not a process-group leader), so $! is the daemon itself.
launch() {
  local name="$1" log="$2"
  shift 2
  setsid "$@" </dev/null >>"$log" 2>&1 &
  echo "$name $!" >>"$pids"
}

stop_cluster() {
  [[ -f "$pids" ]] || { echo "no cluster recorded in $state_dir"; return 0; }
  if [[ -f "$conf" ]] && command -v scancel >/dev/null; then
    # Ends the job steps (slurmstepd) cleanly, so nothing we did not record outlives the daemons.
    SLURM_CONF="$conf" timeout 5 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
  fi
  local name pid waited
  # All at once (each takes ~2 s to exit), then KILL whatever is left after 10 s.
  while read -r name pid; do
    if alive "$name" "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
  done <"$pids"
  for waited in $(seq 100); do
    local running=0
    while read -r name pid; do alive "$name" "$pid" && running=1; done <"$pids"
    ((running)) || break
    sleep 0.1
  done
  while read -r name pid; do
    if alive "$name" "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done <"$pids"
  rm -f "$pids"
  echo "stopped cluster in $state_dir"
}

start_cluster() {
  [[ $EUID -eq 0 ]] || die "needs root (SlurmUser=root, and munged runs as user munge)"
  local tool
  for tool in munged slurmctld slurmd srun sbatch scontrol sinfo setpriv; do
    command -v "$tool" >/dev/null || die "'$tool' not found; install: apt-get install -y --no-install-recommends slurmd slurmctld slurm-client munge"
  done
  [[ "$emulated" =~ ^[0-9]+$ ]] || die "--emulated-nodes must be a count, got '$emulated'"
  if [[ -f "$pids" ]]; then
    local name pid
    while read -r name pid; do
      alive "$name" "$pid" && die "a cluster is already running from $state_dir ($name pid $pid); stop it first"
    done <"$pids"
    rm -f "$pids"
  fi

  local host cpus
  host="$(hostname -s)"
  cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # nproc obeys OMP_NUM_THREADS
  mkdir -p "$state_dir"/{ctld,spool,log,munge}
  : >"$state_dir/log/munged.log"

  # munge: a private key and socket; munged refuses to run unless it owns its files.
  local munge_dir="$state_dir/munge"
  chown munge:munge "$munge_dir" "$state_dir/log/munged.log"
  chmod 0711 "$munge_dir"   # clients need to reach the socket; the key itself is 0400
  if [[ ! -s "$munge_dir/munge.key" ]]; then
    head -c 1024 /dev/urandom >"$munge_dir/munge.key"
  fi
  chown munge:munge "$munge_dir/munge.key"
  chmod 0400 "$munge_dir/munge.key"
  launch munged "$state_dir/log/munged.log" \
    setpriv --reuid=munge --regid=munge --init-groups -- \
    munged --foreground --socket="$munge_dir/munge.socket" --key-file="$munge_dir/munge.key" \
    --pid-file="$munge_dir/munged.pid" --seed-file="$munge_dir/munged.seed" \
    --log-file="$state_dir/log/munged.log"
  local i
  for i in $(seq 100); do [[ -S "$munge_dir/munge.socket" ]] && break; sleep 0.1; done
  [[ -S "$munge_dir/munge.socket" ]] || { tail "$state_dir/log/munged.log" >&2; stop_cluster; die "munged did not start"; }

  local nodes=("$host") ports=()
  for ((i = 1; i <= emulated; i++)); do nodes+=("n$i"); done
  for ((i = 0; i <= ${#nodes[@]}; i++)); do ports+=("$(free_port)"); done

  {
    echo "# generated by slurm/local_cluster.sh"
    echo "ClusterName=accel-local"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmctldPort=${ports[0]}"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$munge_dir/munge.socket"
    echo "CredType=cred/munge"
    echo "StateSaveLocation=$state_dir/ctld"
    echo "SlurmdSpoolDir=$state_dir/spool/%n"
    echo "SlurmctldPidFile=$state_dir/slurmctld.pid"
    echo "SlurmdPidFile=$state_dir/slurmd-%n.pid"
    echo "SlurmctldLogFile=$state_dir/log/slurmctld.log"
    echo "SlurmdLogFile=$state_dir/log/slurmd-%n.log"
    # cgroup plugins do not work in containers without systemd; these do.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "MpiDefault=none"
    echo "ReturnToService=2"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "JobCompType=jobcomp/none"
    # Job ids (and so the rendezvous ports init() derives from them) differ between clusters
    # started side by side on one machine.
    echo "FirstJobId=$((1000 + RANDOM))"
    echo "MinJobAge=600"          # finished jobs stay visible to `scontrol show job` for 10 min
    echo "SlurmdTimeout=60"
    echo "InactiveLimit=0"
    echo "KillWait=5"
    echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Port=${ports[1]} State=UNKNOWN"
    for ((i = 1; i <= emulated; i++)); do
      echo "NodeName=n$i NodeAddr=127.0.0.1 CPUs=$cpus Port=${ports[i + 1]} State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP"
    if ((emulated > 0)); then
      echo "PartitionName=emulated Nodes=n[1-$emulated] MaxTime=INFINITE State=UP"
    fi
  } >"$conf"

  export SLURM_CONF="$conf"
  launch slurmctld "$state_dir/log/slurmctld.out" slurmctld -D -i -f "$conf"
  launch slurmd "$state_dir/log/slurmd-$host.out" slurmd -D -f "$conf" -N "$host"
  for ((i = 1; i <= emulated; i++)); do
    launch slurmd "$state_dir/log/slurmd-n$i.out" slurmd -D -f "$conf" -N "n$i"
  done

  # Ready when every node reports idle.
  local states=""
  for i in $(seq 150); do
    states="$(sinfo --noheader --Node --format='%N %t' 2>/dev/null | sort -u || true)"
    if [[ -n "$states" ]] && ! grep -qv ' idle$' <<<"$states" \
      && [[ "$(wc -l <<<"$states")" -eq "${#nodes[@]}" ]]; then
      echo "cluster up in $state_dir: nodes ${nodes[*]}"
      echo "export SLURM_CONF=$conf"
      return 0
    fi
    sleep 0.2
  done
  echo "node states: ${states:-none}" >&2
  tail -n 20 "$state_dir"/log/*.log "$state_dir"/log/*.out >&2 || true
  stop_cluster >&2
  die "cluster did not become ready in 30 s"
}

case "$command" in
  start) start_cluster ;;
  stop) stop_cluster ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) echo "usage: $0 start|stop|env [--state-dir DIR] [--emulated-nodes N]" >&2; exit 2 ;;
esac
