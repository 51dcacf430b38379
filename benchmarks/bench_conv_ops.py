"""Op timings of the convolution ops at the SpikingJelly-style DVS net's sizes (issue 20).

The three blocks of benchmarks/bench_conv.py's DVS net, with T*B = 160 samples and the events
per sample of its inputs (layer 1: 229 of 2x48x48; layer 2: 818 of 16x24x24; layer 3: 589 of
32x12x12): spike_conv2d_forward without pooling (the net pools after the neuron),
spike_conv2d_backward (dW, db; dx on a 5 % producer set for layers 2 and 3), and the 2x2 max
pooling of the neuron's spikes (3 %) and its backward (conv_pool2d / conv_unpool2d). Minimum
of --repeats calls, in ms; the phases of docs/benchmarks.md ("Issue 20").

    python benchmarks/bench_conv_ops.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

LAYERS = {"L1": (2, 16, 48, 229), "L2": (16, 32, 24, 818), "L3": (32, 64, 12, 589)}
SAMPLES = 160


def best_ms(fn, repeats):
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        raise SystemExit("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    import sparsegrad  # noqa: F401  (registers the ops)
    ops = torch.ops.sparsegrad
    g = torch.Generator().manual_seed(0)
    results = {}
    for name, (cin, cout, h, events) in LAYERS.items():
        x = (torch.rand(SAMPLES, cin * h * h, generator=g) < events / (cin * h * h)).float()
        w = torch.randn(cout, cin, 3, 3, generator=g)
        b = torch.randn(cout, generator=g)
        bits, _ = ops.spike_pack(x)
        geom = ([cin, h, h], [1, 1], [1, 1], [1, 1], 1, "none", 1)
        out, idx = ops.spike_conv2d_forward(bits, w, b, *geom)
        grad = torch.randn(out.shape, generator=g)
        producer = torch.rand(SAMPLES, cin * h * h, generator=g) < 0.05
        cnt = producer.sum(1).to(torch.int32)
        pidx = producer.nonzero()[:, 1].to(torch.int32)
        dx = name != "L1"  # the first block's input is data: no dx
        spikes = (torch.rand(SAMPLES, cout, h, h, generator=g) < 0.03).float()
        pooled, win = ops.conv_pool2d(spikes, "max", 2)
        g_pooled = torch.randn(pooled.shape, generator=g)
        results[name] = dict(
            forward=best_ms(lambda: ops.spike_conv2d_forward(bits, w, b, *geom), args.repeats),
            backward=best_ms(lambda: ops.spike_conv2d_backward(
                grad, idx, bits, w, *geom, cnt if dx else None, pidx if dx else None, 10, dx,
                True, True, False), args.repeats),
            pool=best_ms(lambda: ops.conv_pool2d(spikes, "max", 2), args.repeats),
            unpool=best_ms(lambda: ops.conv_unpool2d(g_pooled, win, "max", 2, h, h), args.repeats))
        print(f"{name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in results[name].items()))
    record = dict(config=vars(args), results=results, machine=common.machine_info("cpu"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
