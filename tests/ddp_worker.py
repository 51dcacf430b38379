"""One process of the 2-process DistributedDataParallel check (launched by test_distributed.py).

    python tests/ddp_worker.py RANK WORLD_SIZE PORT OUT_JSON

Gloo over 127.0.0.1 only. Each rank starts from a different random init (DDP must broadcast
rank 0's), trains on its own data, and checks after every backward that DDP's gradients are the
mean of the ranks' local gradients (computed on a plain, non-DDP copy of the same weights). At
the end every rank writes its parameters' checksum and the largest gradient error to OUT_JSON.
"""
import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import sparsegrad

STEPS = 4


def make_model(backward, seed):
    torch.manual_seed(seed)
    kw = dict(slope=5.0, b_th=0.5, backward=backward)
    return torch.nn.Sequential(sparsegrad.nn.LIF(20, 16, **kw), sparsegrad.nn.LIF(16, 12, **kw),
                               sparsegrad.nn.LIReadout(12, 3, alpha=0.8)).double()


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = (torch.rand(15, 6, 20, generator=g) < 0.3).double()
    y = torch.randint(0, 3, (6,), generator=g)
    return x, y


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(rank, world, backward):
    model = make_model(backward, seed=rank)  # different on each rank before DDP
    ddp = DistributedDataParallel(model)
    # DDP broadcast rank 0's parameters: all replicas now hold the same weights.
    p = flat_params(model)
    all_p = [torch.empty_like(p) for _ in range(world)]
    dist.all_gather(all_p, p)
    assert all(torch.equal(q, all_p[0]) for q in all_p), "DDP did not synchronise the init"

    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    max_err = 0.0
    ranks_differ = False
    for step in range(STEPS):
        x, y = batch(rank, step)
        local = copy.deepcopy(model)  # same weights, no DDP hooks
        local.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(local(x), y).backward()
        g_local = grads(local)
        all_g = [torch.empty_like(g_local) for _ in range(world)]
        dist.all_gather(all_g, g_local)
        ranks_differ |= not torch.equal(all_g[0], all_g[1])
        expected = torch.stack(all_g).mean(dim=0)

        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        g_ddp = grads(model)
        scale = float(expected.abs().max())
        assert scale > 0, "no gradient reached the parameters"
        err = float((g_ddp - expected).abs().max()) / scale
        max_err = max(max_err, err)
        assert err < 1e-12, f"step {step}: DDP gradient differs from the mean by {err}"
        opt.step()

    p = flat_params(model)
    all_p = [torch.empty_like(p) for _ in range(world)]
    dist.all_gather(all_p, p)
    identical = all(torch.equal(q, all_p[0]) for q in all_p)
    moved = not torch.equal(p, flat_params(make_model(backward, seed=0)))
    return dict(max_grad_error=max_err, weights_identical=identical, weights_moved=moved,
                ranks_had_different_gradients=ranks_differ,
                checksum=float(p.sum()), checksum_sq=float((p * p).sum()))


def main():
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        results = {backward: run(rank, world, backward) for backward in ("sparse", "dense")}
        # both ranks done with every collective before either tears gloo down: a rank that
        # destroys the group while its peer's last operation is in flight can abort in gloo's
        # worker threads ("terminate called without an active exception", seen once in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(dict(rank=rank, world=world, results=results), f)


if __name__ == "__main__":
    main()
