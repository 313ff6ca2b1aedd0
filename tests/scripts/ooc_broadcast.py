"""Under torchrun (gloo): OutOfCoreLinear beside an nn.Linear twin, each rank training on its own data,
rank 0's parameters broadcast into every rank after each step (an in-place write torch's version counter
does not see). Each rank writes its report to ``$OOC_REPORT_DIR/rank<N>.json`` (printed lines of two ranks can
interleave on one line of torchrun's merged output)."""
import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from accel.nn.ooc_linear import OutOfCoreLinear


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    seed = int(os.environ.get("OOC_SEED", "0"))
    torch.manual_seed(seed + 1000 * rank)  # the ranks start from different weights
    twin = nn.Linear(20, 13, dtype=torch.float64)
    layer = OutOfCoreLinear.from_linear(copy.deepcopy(twin), devices=["cpu"], memory_limit=4 << 20)
    opt, opt_twin = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (layer, twin))
    forward_errors, twin_errors = [], []
    for _step in range(3):
        x = torch.randn(8, 20, dtype=torch.float64)
        for module, optimizer in ((layer, opt), (twin, opt_twin)):
            optimizer.zero_grad()
            module(x).square().mean().backward()
            optimizer.step()
        for module in (layer, twin):
            for parameter in module.parameters():
                dist.broadcast(parameter.data, src=0)
        probe = torch.randn(5, 20, dtype=torch.float64)
        forward_errors.append((layer(probe) - F.linear(probe, layer.weight, layer.bias)).abs().max().item())
        twin_errors.append(max((p - q).abs().max().item() for p, q in zip(layer.parameters(), twin.parameters())))
    weights = [torch.empty_like(layer.weight) for _ in range(dist.get_world_size())]
    dist.all_gather(weights, layer.weight.detach())
    report = dict(rank=rank, backend=dist.get_backend(), forward_errors=forward_errors, twin_errors=twin_errors,
                  ranks_differ=max((w - weights[0]).abs().max().item() for w in weights))
    (Path(os.environ["OOC_REPORT_DIR"]) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # no rank tears down while a peer still talks (a gloo abort at exit was seen in CI)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
