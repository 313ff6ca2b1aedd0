"""Run on every rank: accel.distributed.init(), an all_reduce, and one JSON line of what was seen.

Used by the torchrun, MPI and SLURM tests. With --replicas it also checks that
accel.cli.replica_difference sees identical replicas as identical and a perturbed one as different.
"""
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
    with distributed.init(timeout=timedelta(seconds=60)) as info:
        total = torch.tensor([float(info.rank + 1)])
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
        if "--replicas" in sys.argv:
            torch.manual_seed(0)  # the same weights on every rank
            model = torch.nn.Linear(3, 2)
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
