"""Recurrent LIF layers (issue 12): an SHD-like recurrent layer and a 2-layer recurrent SHD step.

layer:   x [T=500, B=64, 700] at SHD's 2 % input rate -> 200 neurons with a 200 -> 200 recurrence,
         weights (W and R scaled together) calibrated to ~2 % output spikes; forward, then the
         backward of a fixed random dL/dS (parameters W, R, b).
network: 700 -> recurrent 200 -> recurrent 200 -> leaky-integrator readout 20 (max over time),
         cross-entropy + Adam: one whole training step.
Methods: pytorch (plain-PyTorch BPTT stepping over current.unbind(0): sparsegrad.reference.
rlif_layer with the dense surrogate), sparsegrad_dense, sparsegrad_sparse, and snntorch
(nn.Linear on the whole sequence + snn.RLeaky(all_to_all=True, linear_features=N) stepped in
Python, fast_sigmoid(slope=100): the same model). Before timing, every method's spikes and
gradients are checked against sparsegrad.reference in float64. Ratios come from one run, in wall
time (median) and in 1-thread CPU time (min; see cpu_times: robust to other jobs' load).

    python benchmarks/bench_recurrent.py --json benchmarks/results/recurrent.json

--learn makes alpha and threshold learnable per-neuron parameters in every method (sparsegrad:
nn.RLIF(learn_alpha, learn_threshold), the tensor-parameter kernels, CPU only; snnTorch:
RLeaky(learn_beta, learn_threshold) with per-neuron values; plain PyTorch: leaf tensors), their
gradients checked too (compare with the fixed-parameter run for the cost of learning them).
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_peers import peer_version  # noqa: E402

HIDDEN = 200
BATCH = 64
READOUT_ALPHA = 0.9
METHODS = ("pytorch", "sparsegrad_dense", "sparsegrad_sparse", "snntorch")
QUICK = dict(steps=20, hidden=24, batch=4)
LEARN = False  # --learn: learnable per-neuron alpha and threshold in every method
# issue 12's targets, on the SHD-like layer
TARGETS = dict(bwd_vs_pytorch=15.0, step_vs_snntorch=10.0, saved_fraction=0.10)


# ----------------------------------------------------------------------------- weights
def calibrate_recurrent(x, n_out, *, generator, target_rate=common.TARGET_RATE, max_batch=16,
                        iters=18):
    """W [n_out, n_in] and R [n_out, n_out] ~ N(0, 1), both times one scale searched (bisection
    in log space, on the reference forward of up to max_batch samples) so that the layer fires
    at about target_rate. Returns (W, R, bias, measured rate)."""
    from sparsegrad import reference as ref

    n_in = x.shape[-1]
    w0 = torch.randn(n_out, n_in, generator=generator).to(x.dtype)
    r0 = torch.randn(n_out, n_out, generator=generator).to(x.dtype)
    bias = torch.zeros(n_out, dtype=x.dtype)
    sample = x[:, :max_batch].cpu()

    def rate(scale):
        with torch.no_grad():
            return float(ref.rlif_layer(sample, w0 * scale, r0 * scale, bias,
                                        alpha=common.ALPHA).mean())

    lo = hi = 1e-4
    while rate(hi) < target_rate and hi < 1e4:
        lo, hi = hi, hi * 4
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if rate(mid) < target_rate else (lo, mid)
        if hi / lo < 1.02:
            break
    return w0 * hi, r0 * hi, bias, rate(hi)


# ----------------------------------------------------------------------------- models
class RecurrentLayer(nn.Module):
    """One recurrent layer, every method: weight/rec_weight/bias (snnTorch: fc + recurrent)."""

    def __init__(self, kind, n_in, n_out, dtype, b_th=common.B_TH):
        super().__init__()
        self.kind = kind
        self.b_th = b_th
        self.learn = LEARN
        # per-neuron values with --learn (learnable), else floats
        alpha = torch.full((n_out,), common.ALPHA, dtype=dtype) if self.learn else common.ALPHA
        threshold = (torch.full((n_out,), common.THRESHOLD, dtype=dtype) if self.learn
                     else common.THRESHOLD)
        if kind == "snntorch":
            import snntorch as snn
            from snntorch import surrogate

            self.fc = nn.Linear(n_in, n_out, dtype=dtype)
            self.lif = snn.RLeaky(beta=alpha, threshold=threshold, linear_features=n_out,
                                  all_to_all=True, reset_mechanism="subtract",
                                  learn_beta=self.learn, learn_threshold=self.learn,
                                  spike_grad=surrogate.fast_sigmoid(slope=common.SLOPE)).to(dtype)
        elif kind.startswith("sparsegrad"):
            import sparsegrad.nn as sgnn

            self.layer = sgnn.RLIF(n_in, n_out, alpha=alpha, threshold=threshold, b_th=b_th,
                                   backward=kind.split("_")[1], dtype=dtype,
                                   learn_alpha=self.learn, learn_threshold=self.learn)
        else:  # pytorch / reference: plain autograd
            self.weight = nn.Parameter(torch.empty(n_out, n_in, dtype=dtype))
            self.rec_weight = nn.Parameter(torch.empty(n_out, n_out, dtype=dtype))
            self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype))
            self.alpha = nn.Parameter(alpha) if self.learn else alpha
            self.threshold = nn.Parameter(threshold) if self.learn else threshold

    def load(self, w, r, b):
        with torch.no_grad():
            if self.kind == "snntorch":
                self.fc.weight.copy_(w)
                self.fc.bias.copy_(b)
                self.lif.recurrent.weight.copy_(r)
                self.lif.recurrent.bias.zero_()
            elif self.kind.startswith("sparsegrad"):
                self.layer.weight.copy_(w)
                self.layer.rec_weight.copy_(r)
                self.layer.bias.copy_(b)
            else:
                self.weight.copy_(w)
                self.rec_weight.copy_(r)
                self.bias.copy_(b)

    def forward(self, x):
        if self.kind == "snntorch":
            current = self.fc(x)
            spk, mem = self.lif.init_rleaky()
            spikes = []
            for c in current.unbind(0):  # not current[t]: see common.pytorch_lif
                # snnTorch emits float32 spikes: a no-op cast unless the model is float64
                spk, mem = self.lif(c, spk.to(c.dtype), mem)
                spikes.append(spk)
            return torch.stack(spikes).to(x.dtype)  # snnTorch's spikes are float32
        if self.kind.startswith("sparsegrad"):
            return self.layer(x)
        from sparsegrad import reference as ref

        return ref.rlif_layer(x, self.weight, self.rec_weight, self.bias, alpha=self.alpha,
                              threshold=self.threshold, b_th=self.b_th,
                              backward="sparse" if self.kind == "reference_sparse" else "dense")

    def params(self):
        """[W, R, b] (snnTorch's recurrent bias, zero here, is left out), then [alpha, threshold]
        with --learn."""
        if self.kind == "snntorch":
            extra = [self.lif.beta, self.lif.threshold] if self.learn else []
            return [self.fc.weight, self.lif.recurrent.weight, self.fc.bias] + extra
        if self.kind.startswith("sparsegrad"):
            extra = [self.layer.alpha, self.layer.threshold] if self.learn else []
            return [self.layer.weight, self.layer.rec_weight, self.layer.bias] + extra
        extra = [self.alpha, self.threshold] if self.learn else []
        return [self.weight, self.rec_weight, self.bias] + extra

    def stats(self):
        return self.layer.last_stats if self.kind.startswith("sparsegrad") else None


class RecurrentNet(nn.Module):
    def __init__(self, kind, n_in, hidden, classes, dtype):
        super().__init__()
        self.kind = kind
        self.l1 = RecurrentLayer(kind, n_in, hidden, dtype)
        self.l2 = RecurrentLayer(kind, hidden, hidden, dtype)
        if kind.startswith("sparsegrad"):
            import sparsegrad.nn as sgnn

            self.out = sgnn.LIReadout(hidden, classes, alpha=READOUT_ALPHA, dtype=dtype)
        else:
            self.out = nn.Linear(hidden, classes, dtype=dtype)

    def load(self, weights):
        (w1, r1, b1), (w2, r2, b2), (w3, b3) = weights
        self.l1.load(w1, r1, b1)
        self.l2.load(w2, r2, b2)
        with torch.no_grad():
            self.out.weight.copy_(w3)
            self.out.bias.copy_(b3)

    def forward(self, x):
        h = self.l2(self.l1(x))
        if self.kind.startswith("sparsegrad"):
            return self.out(h)
        return common.pytorch_li_readout(h, self.out.weight, self.out.bias, alpha=READOUT_ALPHA)


# ----------------------------------------------------------------------------- checks
def check_layer(kinds, x, w, r, b, grad, batch=4):
    """float64 on a batch slice: spikes of every method equal the reference's; gradients of the
    dense methods equal the reference's dense ones, the sparse method's the masked ones."""
    xs, gs = x[:, :batch].double().cpu(), grad[:, :batch].double().cpu()
    out = {}
    for kind in list(kinds) + ["reference", "reference_sparse"]:
        layer = RecurrentLayer(kind, x.shape[2], w.shape[0], torch.float64)
        layer.load(w.double(), r.double(), b.double())
        spk = layer(xs)
        spk.backward(gs)
        out[kind] = (spk.detach(), [p.grad for p in layer.params()])
    report = {}
    for kind in kinds:
        want = "reference_sparse" if kind == "sparsegrad_sparse" else "reference"
        mismatches = common.assert_spikes_match(kind, out[kind][0], out["reference"][0])
        rtol = 1e-4 if kind == "snntorch" else 1e-8  # snnTorch's surrogate runs in float32
        got, ref_grads = out[kind][1], out[want][1]
        for g, c in zip(got, ref_grads):
            torch.testing.assert_close(g, c, rtol=rtol, atol=rtol * float(c.abs().max()),
                                       msg=lambda m: f"{kind} vs {want}: {m}")
        report[kind] = (f"spikes equal the reference ({mismatches} flips), gradients match "
                        f"sparsegrad.{want.replace('_', ' ')} (float64, rtol {rtol:g})")
    return report


def check_network(kinds, x, y, weights, hidden, classes, batch=4):
    xs, ys = x[:, :batch].double().cpu(), y[:batch].cpu()
    w64 = [[t.double() for t in layer] for layer in weights]
    logits, grads = {}, {}
    for kind in list(kinds) + ["pytorch"]:
        net = RecurrentNet(kind, x.shape[2], hidden, classes, torch.float64)
        net.load(w64)
        out = net(xs)
        nn.functional.cross_entropy(out, ys).backward()
        logits[kind] = out.detach()
        grads[kind] = [p.grad for layer in (net.l1, net.l2) for p in layer.params()] + \
            [net.out.weight.grad, net.out.bias.grad]
    report = {}
    for kind in kinds:
        rtol = 1e-4 if kind == "snntorch" else 1e-6
        torch.testing.assert_close(logits[kind], logits["pytorch"], rtol=rtol, atol=1e-8)
        if kind != "sparsegrad_sparse":  # sparse: the masked surrogate, checked in check_layer
            for g, c in zip(grads[kind], grads["pytorch"]):
                torch.testing.assert_close(g, c, rtol=rtol, atol=rtol * float(c.abs().max()))
        report[kind] = f"logits match plain PyTorch (float64, rtol {rtol:g})" + (
            "" if kind == "sparsegrad_sparse" else ", gradients too")
    return report


# ----------------------------------------------------------------------------- runs
def cpu_times(forward, backward, reset, repeats):
    """CPU time (time.process_time) of each phase with ONE thread, min over `repeats`, in ms.

    On a machine shared with other jobs the wall clock of short multi-threaded kernels inflates
    far more than that of a single-threaded Python loop; CPU time does not depend on the load.
    With several threads it would count OpenMP threads spin-waiting between the baselines'
    many small ops (2-3x their 1-thread CPU time here), so it is measured single-threaded: the
    work each method does, without credit for sparsegrad's parallel kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fwd, bwd = [], []
    try:
        for _ in range(repeats):
            reset()
            t0 = time.process_time()
            out = forward()
            t1 = time.process_time()
            backward(out)
            t2 = time.process_time()
            del out
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    finally:
        torch.set_num_threads(threads)
    reset()
    f, b = 1e3 * min(fwd), 1e3 * min(bwd)
    return dict(forward=f, backward=b, total=f + b)


def _row(kind, net, forward, backward, reset, args, device):
    times = common.measure(forward, backward, device=device, repeats=args.repeats,
                           warmup=args.warmup, reset=reset)
    cpu = cpu_times(forward, backward, reset, args.repeats) if device.type == "cpu" else None
    reset()
    out, nbytes, ntensors = common.saved_bytes(forward, exclude=list(net.parameters()))
    del out
    reset()
    mem = common.guarded_peak_memory(lambda: (reset(), backward(forward())), device)
    reset()
    return dict(method=kind, times=times, cpu_ms=cpu, saved_bytes=nbytes, saved_tensors=ntensors,
                peak_bytes=mem["peak_bytes"], peak_method=mem["method"])


def _cpu_ratios(row, sparse):
    a, b = row.get("cpu_ms"), sparse.get("cpu_ms")
    if not a or not b:
        return {}
    return dict(cpu_bwd_over_sparse=common.ratio(a["backward"], b["backward"]),
                cpu_step_over_sparse=common.ratio(a["total"], b["total"]))


def run_layer(args, device, dtype, kinds, steps=None, hidden=HIDDEN, batch=BATCH):
    gen = torch.Generator().manual_seed(args.seed)
    x = common.dataset_input("shd", batch, generator=gen, steps=steps, dtype=dtype)
    w, r, b, calib = calibrate_recurrent(x, hidden, generator=gen)
    grad = torch.randn(x.shape[0], batch, hidden, generator=gen).to(dtype)
    correctness = check_layer(kinds, x, w, r, b, grad)
    x, grad = x.to(device), grad.to(device)
    rows = {}
    for kind in kinds:
        layer = RecurrentLayer(kind, x.shape[2], hidden, dtype).to(device)
        layer.load(w.to(device, dtype), r.to(device, dtype), b.to(device, dtype))
        params = list(layer.parameters())

        def reset():
            for p in params:
                p.grad = None

        row = _row(kind, layer, lambda: layer(x), lambda s: s.backward(grad), reset, args, device)
        with torch.no_grad():
            spk = layer(x)
        row["spike_rate"] = common.spike_rate(spk)
        st = layer.stats()
        if st is not None:
            row["active_fraction"] = st.active_fraction
        rows[kind] = row
        del layer
    med = lambda k, phase: rows[k]["times"][phase]["median"]  # noqa: E731
    ratios = {}
    if "sparsegrad_sparse" in rows:
        for kind in rows:
            ratios[kind] = dict(
                fwd_over_sparse=common.ratio(med(kind, "forward"), med("sparsegrad_sparse", "forward")),
                bwd_over_sparse=common.ratio(med(kind, "backward"), med("sparsegrad_sparse", "backward")),
                step_over_sparse=common.ratio(med(kind, "total"), med("sparsegrad_sparse", "total")),
                saved_sparse_over_this=common.ratio(rows["sparsegrad_sparse"]["saved_bytes"],
                                                    rows[kind]["saved_bytes"]),
                peak_sparse_over_this=common.ratio(rows["sparsegrad_sparse"]["peak_bytes"],
                                                   rows[kind]["peak_bytes"]))
            ratios[kind].update(_cpu_ratios(rows[kind], rows["sparsegrad_sparse"]))
    info = dict(dataset="shd", steps=x.shape[0], batch=batch, n_in=x.shape[2], n_out=hidden,
                input_rate=common.spike_rate(x), calibration_rate=calib)
    return dict(label="layer", problem=info, correctness=correctness, methods=rows, ratios=ratios)


def run_network(args, device, dtype, kinds, steps=None, hidden=HIDDEN, batch=BATCH):
    spec = common.DATASETS["shd"]
    gen = torch.Generator().manual_seed(args.seed + 7)
    x = common.dataset_input("shd", batch, generator=gen, steps=steps, dtype=dtype)
    y = torch.randint(0, spec["classes"], (batch,), generator=gen)
    from sparsegrad import reference as ref

    w1, r1, b1, c1 = calibrate_recurrent(x, hidden, generator=gen)
    with torch.no_grad():
        h = ref.rlif_layer(x[:, :16], w1, r1, b1, alpha=common.ALPHA)
    w2, r2, b2, c2 = calibrate_recurrent(h, hidden, generator=gen)
    w3 = torch.randn(spec["classes"], hidden, generator=gen).to(dtype) / hidden ** 0.5
    weights = [(w1, r1, b1), (w2, r2, b2), (w3, torch.zeros(spec["classes"], dtype=dtype))]
    correctness = check_network(kinds, x, y, weights, hidden, spec["classes"])
    x, y = x.to(device), y.to(device)
    rows = {}
    for kind in kinds:
        net = RecurrentNet(kind, x.shape[2], hidden, spec["classes"], dtype).to(device)
        net.load([[t.to(device, dtype) for t in layer] for layer in weights])
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        snapshot = {k: v.clone() for k, v in net.state_dict().items()}

        def forward():
            return nn.functional.cross_entropy(net(x), y)

        def backward(loss):
            loss.backward()
            opt.step()

        def reset():
            opt.zero_grad(set_to_none=True)

        times = common.measure(forward, backward, device=device, repeats=args.repeats,
                               warmup=args.warmup, reset=reset)
        net.load_state_dict(snapshot)  # memory and activity figures of the calibrated network
        row = _row(kind, net, forward, lambda loss: loss.backward(), reset,
                   argparse_like(args, repeats=1, warmup=0), device)
        row["times"] = times
        if device.type == "cpu":  # the step as timed above (loss.backward() + Adam)
            row["cpu_ms"] = cpu_times(forward, backward, reset, args.repeats)
            net.load_state_dict(snapshot)
        if kind.startswith("sparsegrad"):
            net.load_state_dict(snapshot)
            with torch.no_grad():
                net(x)
            row["active_fractions"] = [net.l1.stats().active_fraction, net.l2.stats().active_fraction]
            row["spike_rates"] = [net.l1.stats().spike_rate, net.l2.stats().spike_rate]
        rows[kind] = row
        del net, opt
    ratios = {}
    if "sparsegrad_sparse" in rows:
        sp = rows["sparsegrad_sparse"]
        for kind, r in rows.items():
            ratios[kind] = dict(
                step_over_sparse=common.ratio(r["times"]["total"]["median"], sp["times"]["total"]["median"]),
                bwd_over_sparse=common.ratio(r["times"]["backward"]["median"],
                                             sp["times"]["backward"]["median"]),
                saved_sparse_over_this=common.ratio(sp["saved_bytes"], r["saved_bytes"]),
                peak_sparse_over_this=common.ratio(sp["peak_bytes"], r["peak_bytes"]))
            ratios[kind].update(_cpu_ratios(r, sp))
    info = dict(dataset="shd", steps=x.shape[0], batch=batch, n_in=x.shape[2], hidden=hidden,
                classes=spec["classes"], input_rate=common.spike_rate(x),
                layer1_calibration_rate=c1, layer2_calibration_rate=c2)
    return dict(label="network", problem=info, correctness=correctness, methods=rows,
                ratios=ratios)


def argparse_like(args, **overrides):
    values = dict(vars(args))
    values.update(overrides)
    return type("Args", (), values)


# ----------------------------------------------------------------------------- output
def print_result(res):
    info = res["problem"]
    if res["label"] == "layer":
        print(f"\n== SHD-like recurrent layer {info['n_in']}->{info['n_out']} (+{info['n_out']}->"
              f"{info['n_out']}), T={info['steps']} B={info['batch']}, input rate "
              f"{100 * info['input_rate']:.2f}%")
    else:
        print(f"\n== 2-layer recurrent SHD step {info['n_in']}-{info['hidden']}r-{info['hidden']}r-"
              f"{info['classes']}, T={info['steps']} B={info['batch']}")
    rows = []
    for m, r in res["methods"].items():
        t, q = r["times"], res["ratios"].get(m, {})
        act = r.get("active_fractions") or ([r["active_fraction"]] if "active_fraction" in r else None)
        cpu = r.get("cpu_ms") or {}
        rows.append([m, common.fmt_ms(t["forward"]), common.fmt_ms(t["backward"]),
                     common.fmt_ms(t["total"]),
                     "/".join(f"{cpu[k]:.0f}" for k in ("forward", "backward")) if cpu else "-",
                     common.fmt_mb(r["saved_bytes"]),
                     common.fmt_mb(r["peak_bytes"]),
                     "/".join(f"{100 * a:.1f}" for a in act) if act else "-",
                     f"{q.get('bwd_over_sparse', math.nan):.1f}x",
                     f"{q.get('step_over_sparse', math.nan):.1f}x"])
    common.print_table(["method", "fwd ms", "bwd ms", "step ms", "1-thr cpu fwd/bwd", "saved MB",
                        "peak MB", "active %", "bwd / sparse", "step / sparse"], rows)
    if res.get("load_average"):
        print(f"(1-minute load average when it finished: {res['load_average'][0]:.1f})")


def evaluate_checks(results):
    for res in results:
        if res["label"] != "layer" or "sparsegrad_sparse" not in res["methods"]:
            continue
        q = res["ratios"]
        checks = {}
        if "pytorch" in q:
            v = q["pytorch"]["bwd_over_sparse"]
            checks["sparse backward >= 15x plain-PyTorch BPTT backward"] = (v, v >= TARGETS["bwd_vs_pytorch"])
            v = q["pytorch"]["saved_sparse_over_this"]
            checks["sparse saved bytes <= 10% of plain PyTorch's"] = (v, v <= TARGETS["saved_fraction"])
        if "snntorch" in q:
            v = q["snntorch"]["step_over_sparse"]
            checks["sparse training step (fwd+bwd) >= 10x snnTorch RLeaky's"] = (
                v, v >= TARGETS["step_vs_snntorch"])
        # the same two ratios in single-thread CPU time (independent of other jobs' load)
        if "cpu_bwd_over_sparse" in q.get("pytorch", {}):
            v = q["pytorch"]["cpu_bwd_over_sparse"]
            checks["(1-thread CPU time) sparse backward >= 15x plain-PyTorch BPTT backward"] = (
                v, v >= TARGETS["bwd_vs_pytorch"])
        if "cpu_step_over_sparse" in q.get("snntorch", {}):
            v = q["snntorch"]["cpu_step_over_sparse"]
            checks["(1-thread CPU time) sparse training step >= 10x snnTorch RLeaky's"] = (
                v, v >= TARGETS["step_vs_snntorch"])
        return {k: dict(value=v, met=bool(ok)) for k, (v, ok) in checks.items()}
    return {}


def main(argv=None):
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["layer", "network"],
                        choices=["layer", "network"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--learn", action="store_true",
                        help="learnable per-neuron alpha and threshold in every method")
    args = parser.parse_args(argv)
    global LEARN
    LEARN = bool(args.learn)
    device, dtype = common.setup(args)
    kinds = [k for k in args.methods if k != "snntorch" or peer_version("snntorch")[0]]
    size = dict(steps=QUICK["steps"], hidden=QUICK["hidden"], batch=QUICK["batch"]) if args.quick else {}
    results = []
    for config in args.configs:
        run = run_layer if config == "layer" else run_network
        res = run(args, device, dtype, kinds, **size)
        res["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        res["learn"] = LEARN
        print_result(res)
        results.append(res)
    checks = evaluate_checks(results)
    if checks:
        print("\nissue 12 check (SHD-like recurrent layer, one run):")
        for name, c in checks.items():
            print(f"  {'MET ' if c['met'] else 'MISS'} {name}: {c['value']:.3g}")
    payload = common.result_header("bench_recurrent", args, device)
    payload.update(results=results, checks=checks,
                   skipped={k: peer_version(k)[1] for k in args.methods if k not in kinds})
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
