"""Convolutional SNNs' training steps: snnTorch's tutorial CSNN and a SpikingJelly-style DVS net, each
as its library runs it, vs sparsegrad.convert of the same model.

The network is snnTorch tutorial 6's (Conv2d(1,12,5) -> MaxPool2d(2) -> Leaky -> Conv2d(12,64,5)
-> MaxPool2d(2) -> Leaky -> Flatten -> Linear(1024,10) -> Leaky(output=True), beta = 0.5,
spike_grad = fast_sigmoid(slope=25)) on 28x28 inputs, T = 25 steps, batch 128. One training step
is forward, snnTorch's ce_rate_loss on the output spikes, backward and an Adam update:

* snntorch: the model as the tutorial runs it, one call per time step (utils.reset first);
* sparsegrad sparse: the same model after sparsegrad.convert(model), one call on the whole
  [T, B, 1, 28, 28] sequence: each conv -> MaxPool2d -> Leaky is one sparsegrad.nn.ConvLIF
  (sparsegrad/conv.py: bits / uint8 pool offsets / the active set saved, sparse backward), the
  last Linear + Leaky TimeDistributed(Linear) + LIFNeuron (output=True needs the membrane);
* sparsegrad dense: convert(model, backward="dense"): TimeDistributed convolutions and pooling
  (ATen) and LIFNeuron with the dense surrogate (no fusion: the dense BPTT baseline).

Inputs are direct-coded as in the tutorial (the same image at every step); the images are
synthetic (uniform noise in [0, 1], no download). The weights are PyTorch's default init with
the two convolutions and the Linear scaled by 2, 3 and 3 (WEIGHT_SCALE), so that every layer
spikes at the rates of a trained network (about 6 %, 12 % and 5 % of the entries; printed).
Before timing, the converted model's spikes and membrane are compared with snnTorch's on the
benchmark batch, and the effect of folding time into the batch on each layer's rounding is
measured (``folding``: per-step calls vs one call on T*B samples, for several batch sizes).

The DVS net (``dvs_net_bench``, skipped with --no-dvs): three blocks Conv2d(3x3, padding 1) ->
LIFNode -> MaxPool2d(2), 2 -> 16 -> 32 -> 64 channels, then Flatten -> Linear(2304, 10) -> LIFNode,
T = 10, B = 16, 2x48x48 inputs with 5 % events, no BatchNorm; SpikingJelly 2.0.0's multi-step
mode (its pure-torch backend) vs convert(net) (three ConvLIF(pool_position="after") around the
exact SpikingJellyNeuron); loss cross-entropy of the output spike rates, Adam. Weights scaled by
DVS_WEIGHT_SCALE so that every layer spikes (rates printed). For both networks, saved-for-backward
bytes are counted with saved_tensors_hooks (each storage once; the parameters and the input,
alive anyway, not counted).

b_th: both networks are converted with b_th=0.2 given explicitly (``--b-th``), the paper's
default and the value the published numbers (benchmarks/results/conv*.json, docs/design.md,
"Convolutional layers") were measured at. ``convert``'s own default is now b_th="auto" (the
smallest b_th keeping 95 % of each neuron's surrogate mass: 0.76 for fast_sigmoid(slope=25),
0.92 for SpikingJelly's sigmoid(alpha=4)), which makes several times more entries active and so
is a different, slower workload; convert's warning that 0.2 keeps less of the surrogate's mass
(83 % of fast_sigmoid(25)'s, 38 % of sigmoid(4)'s) is expected here and silenced. ``--b-th
auto`` measures convert's default instead.

``--batchnorm`` adds a second DVS variant with a BatchNorm2d between each convolution and its
neuron (SpikingJelly's layer.BatchNorm2d, multi-step: statistics over all T*B samples), run by
both libraries, to say what BatchNorm costs: training-mode BatchNorm couples all positions of a
channel, so the gradient into the convolution is dense there and the conv + neuron pair cannot
be fused into ConvLIF (docs/design.md, section 3d).

``--profile`` adds each DVS step's per-op self CPU time (torch.profiler; the per-phase breakdown
in docs/benchmarks.md comes from it).

``--device cuda`` runs both networks (and the peers: snnTorch, SpikingJelly) on the current CUDA
device; without one the script stops with a message saying so. The time-folding check always
runs on the CPU.

    python benchmarks/bench_conv.py --threads 2 --json benchmarks/results/conv.json
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

STEPS, BATCH, BETA, SLOPE = 25, 128, 0.5, 25.0
QUICK = dict(steps=4, batch=8)
FOLD_BATCHES = (1, 2, 6, 8, 32, 128)
WEIGHT_SCALE = {0: 2.0, 3: 3.0, 7: 3.0}  # layer index -> factor on its weight (and conv1's bias)


def tutorial_csnn(snn, surrogate, *, beta=BETA, slope=SLOPE, dtype=torch.float32):
    """snnTorch tutorial 6's CSNN, as written there."""
    spike_grad = surrogate.fast_sigmoid(slope=slope)
    return nn.Sequential(
        nn.Conv2d(1, 12, 5), nn.MaxPool2d(2),
        snn.Leaky(beta=beta, spike_grad=spike_grad, init_hidden=True),
        nn.Conv2d(12, 64, 5), nn.MaxPool2d(2),
        snn.Leaky(beta=beta, spike_grad=spike_grad, init_hidden=True),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10),
        snn.Leaky(beta=beta, spike_grad=spike_grad, init_hidden=True, output=True),
    ).to(dtype)


def snntorch_forward(net, utils, x):
    """The tutorial's forward_pass: reset, one call per step, outputs stacked."""
    utils.reset(net)
    spk_rec, mem_rec = [], []
    for t in range(x.shape[0]):
        spk, mem = net(x[t])
        spk_rec.append(spk)
        mem_rec.append(mem)
    return torch.stack(spk_rec), torch.stack(mem_rec)


def make_step(forward, params, loss_fn, y):
    opt = torch.optim.Adam(params, lr=1e-3)

    def run():
        return forward()

    def back(out):
        spk, _ = out
        loss = loss_fn(spk, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step():
        back(run())

    return run, back, step


def folding_check(snn, surrogate, steps, batches, generator, dtype):
    """Elements (and spikes) where one call on T*B samples differs from T calls on B samples."""
    rows = []
    net = tutorial_csnn(snn, surrogate, dtype=dtype)
    torch.manual_seed(0)
    small = nn.Linear(32, 24).to(dtype)  # an MLP-sized layer (tests/test_convert.py's)
    layers = {"conv1": (net[0], (1, 28, 28)), "conv2": (net[3], (12, 12, 12)),
              "fc": (net[7], (1024,)), "linear 32->24": (small, (32,))}
    for batch in batches:
        for name, (layer, shape) in layers.items():
            for kind in ("spikes", "dense"):
                if kind == "spikes":
                    x = (torch.rand(steps, batch, *shape, generator=generator) < 0.2).to(dtype)
                elif name == "conv1":
                    x = torch.rand(steps, batch, *shape, generator=generator).to(dtype)
                else:
                    continue
                with torch.no_grad():
                    folded = layer(x.flatten(0, 1)).unflatten(0, (steps, batch))
                    stepped = torch.stack([layer(x[t]) for t in range(steps)])
                diff = folded != stepped
                rows.append(dict(layer=name, input=kind, batch=batch, steps=steps,
                                 elements=diff.numel(), differing=int(diff.sum()),
                                 max_abs_diff=float((folded - stepped).abs().max())))
    return rows


def convert_exactly(model, b_th, **kwargs):
    """sparsegrad.convert(model, b_th=b_th, ...), any warning an error (these models convert
    exactly) except the expected one that a given b_th keeps less than 95 % of the surrogate."""
    import sparsegrad

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=r"b_th=.* keeps .* of the", category=UserWarning)
        return sparsegrad.convert(model, b_th=b_th, **kwargs)


def parse_b_th(value: str):
    if value == "auto":
        return value
    try:
        b = float(value)
    except ValueError:
        raise SystemExit(f"--b-th must be 'auto' or a positive number, got {value!r}") from None
    if not b > 0:
        raise SystemExit(f"--b-th must be 'auto' or a positive number, got {value!r}")
    return b


DVS = dict(steps=10, batch=16, size=48, rate=0.05, classes=10)
DVS_QUICK = dict(steps=3, batch=2, size=16, rate=0.05, classes=10)
DVS_WEIGHT_SCALE = {0: 8.0, 3: 6.0, 6: 7.0, 10: 30.0}  # layer index -> factor (spiking rates printed)


def spikingjelly_dvs_net(dtype=torch.float32, size=48, classes=10, batchnorm=False):
    """A SpikingJelly-style DVS net, multi-step torch backend: three blocks
    Conv2d(3x3, padding 1) -> LIFNode -> MaxPool2d(2) (2 -> 16 -> 32 -> 64 channels), then
    Flatten -> Linear -> LIFNode; LIFNode's defaults (tau 2, hard reset to 0, sigmoid
    surrogate). batchnorm=True puts a BatchNorm2d between each convolution and its neuron (the
    weights are then drawn and scaled as without it: BatchNorm rescales the currents itself)."""
    from spikingjelly.activation_based import functional, layer, neuron

    blocks, scale = [], {}
    for k, (cin, cout) in enumerate(((2, 16), (16, 32), (32, 64))):
        scale[len(blocks)] = DVS_WEIGHT_SCALE[3 * k]
        blocks.append(layer.Conv2d(cin, cout, 3, padding=1))
        if batchnorm:
            blocks.append(layer.BatchNorm2d(cout))
        blocks += [neuron.LIFNode(), layer.MaxPool2d(2)]
    side = size // 8
    scale[len(blocks) + 1] = DVS_WEIGHT_SCALE[10]
    net = nn.Sequential(*blocks, layer.Flatten(), layer.Linear(64 * side * side, classes),
                        neuron.LIFNode()).to(dtype)
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        for i, factor in scale.items():
            net[i].weight.mul_(factor)
    return net


def dvs_net_bench(args, device, dtype, batchnorm=False):
    """Training step and saved bytes of the DVS net: SpikingJelly (multi-step, torch backend) vs
    sparsegrad.convert of the same model (ConvLIF blocks; with batchnorm=True the convolution,
    BatchNorm2d, neuron and pooling stay separate layers)."""
    try:
        from spikingjelly.activation_based import functional
    except ImportError as exc:
        print(f"DVS net skipped: needs spikingjelly ({exc})")
        return None

    cfg = DVS_QUICK if args.quick else DVS
    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (cfg["steps"], cfg["batch"], 2, cfg["size"], cfg["size"])
    x = (torch.rand(shape, generator=g) < cfg["rate"]).to(dtype).to(device)
    y = torch.randint(0, cfg["classes"], (cfg["batch"],), generator=g).to(device)
    torch.manual_seed(args.seed)
    net = spikingjelly_dvs_net(dtype, cfg["size"], cfg["classes"], batchnorm).to(device)
    model = convert_exactly(net, args.b_th)

    def loss_fn(out):  # spike counts as logits, as SpikingJelly's examples' rate readout
        return nn.functional.cross_entropy(out.mean(0) * 10.0, y)

    def sj_forward():
        functional.reset_net(net)
        return net(x)

    with torch.no_grad():
        ref = sj_forward()
        out = model(x)
        check = dict(spike_mismatches=int((out != ref).sum()), output_rate=float(ref.mean()))
        h, rates = x, {}
        for i, layer in enumerate(model):
            h = layer(h)
            if getattr(layer, "last_stats", None) is not None:
                rates[f"layer{i}_spike_rate"] = layer.last_stats.spike_rate
                rates[f"layer{i}_active_fraction"] = layer.last_stats.active_fraction
    results, cases = {}, {}
    for name, fwd, params in (("spikingjelly", sj_forward, list(net.parameters())),
                              ("sparsegrad sparse", lambda: model(x), list(model.parameters()))):
        opt = torch.optim.Adam(params, lr=1e-3)

        def back(o, opt=opt):
            loss = loss_fn(o)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        cases[name] = (fwd, back, common.weight_reset(params))
        mem = common.guarded_peak_memory(lambda f=fwd, b=back: b(f()), device)
        _, nbytes, ntensors = common.saved_bytes(fwd, exclude=params + [x])
        results[name] = dict(peak_memory=mem, saved_bytes=nbytes, saved_tensors=ntensors)
        if args.profile:
            results[name]["profile"] = common.profile_step(lambda f=fwd, b=back: b(f()), name)
    # steps of the two libraries in alternation (common.measure_interleaved)
    for name, times in common.measure_interleaved(cases, device=device, repeats=args.repeats,
                                                  warmup=args.warmup).items():
        results[name]["time"] = times
    base = results["spikingjelly"]
    rows = [[name, common.fmt_ms(r["time"]["forward"]), common.fmt_ms(r["time"]["backward"]),
             common.fmt_ms(r["time"]["total"]),
             f"{common.ratio(base['time']['total']['median'], r['time']['total']['median']):.2f}x",
             common.fmt_mb(r["saved_bytes"]),
             f"{common.ratio(r['saved_bytes'], base['saved_bytes']):.3f}"]
            for name, r in results.items()]
    print(f"SpikingJelly-style DVS net{' with BatchNorm2d' if batchnorm else ''} training step, "
          f"T={cfg['steps']}, batch {cfg['batch']}, 2x{cfg['size']}x{cfg['size']} at "
          f"{cfg['rate']:.0%} events, b_th={args.b_th}, {torch.get_num_threads()} threads; "
          f"rates {rates}")
    common.print_table(["method", "forward ms", "backward ms", "step ms", "speed-up", "saved MB",
                        "saved / spikingjelly"], rows)
    print(f"spikes vs SpikingJelly: {check}")
    return dict(config=dict(cfg, batchnorm=batchnorm, b_th=args.b_th), rates=rates, check=check,
                results=results)


def batchnorm_cost(plain, with_bn):
    """What BatchNorm2d adds to each library's DVS step (medians of the same run)."""
    if plain is None or with_bn is None:
        return None
    cost = {}
    for name in plain["results"]:
        t0 = plain["results"][name]["time"]["total"]["median"]
        t1 = with_bn["results"][name]["time"]["total"]["median"]
        cost[name] = dict(step_ms=t0, step_ms_batchnorm=t1, added_ms=t1 - t0,
                          factor=common.ratio(t1, t0),
                          saved_bytes=plain["results"][name]["saved_bytes"],
                          saved_bytes_batchnorm=with_bn["results"][name]["saved_bytes"])
    print("BatchNorm2d between conv and neuron (DVS net): " + "; ".join(
        f"{n}: {c['step_ms']:.1f} -> {c['step_ms_batchnorm']:.1f} ms ({c['factor']:.2f}x), saved "
        f"{c['saved_bytes'] / 1e6:.1f} -> {c['saved_bytes_batchnorm'] / 1e6:.1f} MB"
        for n, c in cost.items()))
    return cost


def main(argv=None):
    p = common.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--no-dvs", action="store_true", help="skip the SpikingJelly-style DVS net")
    p.add_argument("--batchnorm", action="store_true",
                   help="also the DVS net with BatchNorm2d between each conv and its neuron")
    p.add_argument("--profile", action="store_true",
                   help="also print (and save) each DVS step's per-op self CPU times")
    p.add_argument("--b-th", default="0.2", type=parse_b_th, dest="b_th",
                   help="b_th given to sparsegrad.convert (default 0.2, the published setup; "
                        "'auto' for convert's default)")
    args = p.parse_args(argv)
    device, dtype = common.setup(args)
    try:
        import snntorch as snn
        from snntorch import functional as SF
        from snntorch import surrogate, utils
    except ImportError as exc:
        raise SystemExit(f"bench_conv needs snntorch ({exc})")

    steps, batch = (QUICK["steps"], QUICK["batch"]) if args.quick else (args.steps, args.batch)
    g = torch.Generator().manual_seed(args.seed)
    image = torch.rand(batch, 1, 28, 28, generator=g).to(dtype)
    x = image.unsqueeze(0).expand(steps, *image.shape).contiguous().to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    loss_fn = SF.ce_rate_loss()

    torch.manual_seed(args.seed)
    original = tutorial_csnn(snn, surrogate, dtype=dtype).to(device)
    with torch.no_grad():
        for i, factor in WEIGHT_SCALE.items():
            original[i].weight.mul_(factor)
        original[0].bias.mul_(WEIGHT_SCALE[0])
    # the tutorial CSNN converts exactly (convert_exactly: any other warning is an error)
    converted = {mode: convert_exactly(original, args.b_th, backward=mode)
                 for mode in ("sparse", "dense")}

    # Correctness on the benchmark batch (no grad), then the rates the timing runs at.
    with torch.no_grad():
        spk_ref, mem_ref = snntorch_forward(original, utils, x)
        check = {}
        for mode, model in converted.items():
            spk, mem = model(x)
            check[mode] = dict(spike_mismatches=int((spk != spk_ref).sum()),
                               membrane_max_abs_diff=float((mem - mem_ref).abs().max()))
        hidden = converted["sparse"]
        h1 = hidden[2](hidden[1](hidden[0](x)))
        h2 = hidden[5](hidden[4](hidden[3](h1)))
        rates = dict(hidden1=float(h1.mean()), hidden2=float(h2.mean()),
                     output=float(spk_ref.mean()))
        for i, j in ((2, 0), (5, 3), (8, 8)):  # the neuron, or the ConvLIF that holds it
            layer = hidden[i] if getattr(hidden[i], "last_stats", None) is not None else hidden[j]
            rates[f"active_fraction_{i}"] = layer.last_stats.active_fraction

    results, cases = {}, {}
    runners = {
        "snntorch": (lambda: snntorch_forward(original, utils, x), original.parameters()),
        "sparsegrad sparse": (lambda: converted["sparse"](x), converted["sparse"].parameters()),
        "sparsegrad dense": (lambda: converted["dense"](x), converted["dense"].parameters()),
    }
    for name, (fwd, params) in runners.items():
        params = list(params)
        run, back, step = make_step(fwd, params, loss_fn, y)
        cases[name] = (run, back, common.weight_reset(params))
        mem = common.guarded_peak_memory(step, device)
        _, nbytes, ntensors = common.saved_bytes(fwd, exclude=params + [x])
        results[name] = dict(peak_memory=mem, saved_bytes=nbytes, saved_tensors=ntensors)
    for name, times in common.measure_interleaved(cases, device=device, repeats=args.repeats,
                                                  warmup=args.warmup).items():
        results[name]["time"] = times

    folding = folding_check(snn, surrogate, steps, (2, 8) if args.quick else FOLD_BATCHES, g, dtype)

    base = results["snntorch"]
    rows = []
    for name, r in results.items():
        rows.append([name, common.fmt_ms(r["time"]["forward"]), common.fmt_ms(r["time"]["backward"]),
                     common.fmt_ms(r["time"]["total"]),
                     f"{common.ratio(base['time']['total']['median'], r['time']['total']['median']):.2f}x",
                     common.fmt_mb(r["peak_memory"]["peak_bytes"]),
                     f"{common.ratio(r['peak_memory']['peak_bytes'], base['peak_memory']['peak_bytes']):.2f}",
                     common.fmt_mb(r["saved_bytes"]),
                     f"{common.ratio(r['saved_bytes'], base['saved_bytes']):.3f}"])
    print(f"tutorial CSNN training step, T={steps}, batch {batch}, 28x28, {dtype}, "
          f"b_th={args.b_th}, {torch.get_num_threads()} threads; rates {rates}")
    common.print_table(["method", "forward ms", "backward ms", "step ms", "speed-up",
                        "peak MB", "mem / snntorch", "saved MB", "saved / snntorch"], rows)
    print(f"spikes vs snnTorch: {check}")
    diff_rows = [r for r in folding if r["differing"]]
    print(f"time folding: {len(diff_rows)} of {len(folding)} layer/batch cases round differently"
          + "".join(f"\n  {r['layer']} ({r['input']}, batch {r['batch']}): {r['differing']} of "
                    f"{r['elements']} elements, max |diff| {r['max_abs_diff']:.2e}"
                    for r in diff_rows))
    payload = common.result_header("bench_conv.py", args, device)
    dvs = None if args.no_dvs else dvs_net_bench(args, device, dtype)
    dvs_bn = dvs_net_bench(args, device, dtype, batchnorm=True) if args.batchnorm and \
        not args.no_dvs else None
    payload.update(config=dict(steps=steps, batch=batch, beta=BETA, slope=SLOPE, b_th=args.b_th,
                               surrogate="fast_sigmoid", image="28x28 uniform noise, direct-coded",
                               loss="snntorch.functional.ce_rate_loss", optimizer="Adam(1e-3)"),
                   rates=rates, check=check, results=results, folding=folding, dvs=dvs,
                   dvs_batchnorm=dvs_bn, batchnorm_cost=batchnorm_cost(dvs, dvs_bn))
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
