"""Run on every rank: accel.distributed.init(), an all_reduce, and one JSON line of what was seen.

Used by the torchrun, MPI and SLURM tests. With --replicas it also checks that
accel.cli.replica_difference sees identical replicas as identical and a perturbed one as different.
``--backend NAME`` and ``--device cpu|cuda`` go to init(): the tests ask for gloo on the CPU, so that
several ranks on a one-GPU machine neither pick nccl nor share the GPU.
"""
import argparse
import json
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from accel import distributed
from accel.cli import replica_difference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", action="store_true")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    with distributed.init(backend=args.backend, timeout=timedelta(seconds=60), device=args.device) as info:
        total = torch.tensor([float(info.rank + 1)], device=info.device)  # on the group's device
        dist.all_reduce(total)
        launch = distributed.detect()
        nodelist = os.environ.get("SLURM_STEP_NODELIST")
        record = {
            "rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
            "local_world_size": info.local_world_size, "launcher": info.launcher, "backend": info.backend,
            "device": str(info.device), "all_reduce": total.item(), "host": socket.gethostname(),
            "master_addr": launch.master_addr, "master_port": launch.master_port,
            "nodelist_first": distributed.expand_hostlist(nodelist)[0] if nodelist else None,
            "group_backend": dist.get_backend(), "group_world_size": dist.get_world_size(),
            **{name: os.environ.get(name) for name in ("SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID",
                                                      "SLURMD_NODENAME", "PMI_RANK", "LOCAL_RANK")},
        }
        if args.replicas:
            torch.manual_seed(0)  # the same weights on every rank
            model = torch.nn.Linear(3, 2).to(info.device)
            record["replica_difference_same"] = replica_difference(model)
            if info.rank == 1:
                with torch.no_grad():
                    model.weight[0, 0] += 0.25
            record["replica_difference_perturbed"] = replica_difference(model)
        sys.stdout.write("REPORT " + json.dumps(record) + "\n")
        sys.stdout.flush()


def read_reports(output: str) -> dict[int, dict]:
    """The REPORT records in a launcher's combined output, by rank."""
    records = [json.loads(line.split("REPORT ", 1)[1]) for line in output.splitlines() if "REPORT {" in line]
    return {record["rank"]: record for record in records}


if __name__ == "__main__":
    main()
