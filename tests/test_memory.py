"""What the forward keeps for the backward (DESIGN.md §4): no dense [T,B,N] float tensor in
sparse mode, and a small fraction of dense BPTT's bytes."""
import torch

import sparsegrad
from sparsegrad import reference as ref


def saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def nbytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:  # the same storage saved twice counts once
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def shd_like(T=200, B=16, n_in=700, n_out=200):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(T, B, n_in, generator=g) < 0.02).float()
    w = (torch.randn(n_out, n_in, generator=g) * 0.05).requires_grad_(True)
    b = torch.zeros(n_out, requires_grad=True)
    return x, w, b


def test_sparse_saves_no_dense_float_tensor():
    x, w, b = shd_like()
    T, B, n_out = x.shape[0], x.shape[1], w.shape[0]
    _, saved = saved_tensors(lambda: sparsegrad.lif_layer(x, w, b, alpha=0.95))
    for t in saved:
        if t.is_floating_point() and t is not w:
            assert t.numel() < T * B * n_out / 10, f"saved a large float tensor {tuple(t.shape)}"


def test_sparse_saved_bytes_at_most_5_percent_of_dense_bptt():
    x, w, b = shd_like()
    out, saved_sparse = saved_tensors(lambda: sparsegrad.lif_layer(x, w, b, alpha=0.95))
    assert 0.002 < out.mean() < 0.05  # a realistic, sparse firing regime
    _, saved_ref = saved_tensors(lambda: ref.lif_layer(x, w, b, alpha=0.95))
    # the weight is a parameter, alive anyway: count what the layer adds
    sparse_bytes = nbytes([t for t in saved_sparse if t is not w])
    ref_bytes = nbytes([t for t in saved_ref if t is not w])
    assert sparse_bytes <= 0.05 * ref_bytes, (sparse_bytes, ref_bytes)
