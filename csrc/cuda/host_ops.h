// Host side of the CUDA ops: argument checks, buffers, the sequence of kernel launches and ATen
// calls (GEMMs, scans, sorts). Written once as templates over a Launcher and compiled twice:
//   - csrc/cuda/sparsegrad_cuda.cu: Launcher = CudaLauncher (kernel<<<grid, block, 0, stream>>>
//     on the current stream, C10_CUDA_KERNEL_LAUNCH_CHECK after each launch), CUDA tensors;
//   - csrc/emul/emul_ops.cpp: Launcher = the host emulation (csrc/cuda/emulation.h), CPU tensors.
// So the emulated ops run the same kernel bodies, in the same order, with the same scans, sorts
// and GEMMs in between, as the GPU ops.
//
// Launcher requirements:
//   static void launch(int64_t n, void (*kernel)(KArgs...), Args... args): runs `kernel` with
//     enough threads for a grid-stride loop over n items (nothing when n == 0);
//   static LaunchShape warp_shape(int64_t n), walk_shape(int64_t n): whole-warp geometries for n
//     threads (kernels with warp collectives / block reductions; the forward walks, which may
//     take smaller blocks to reach more SMs), and
//   static void launch_in(LaunchShape shape, kernel, args...): a launch with that geometry;
//   static int64_t resident_threads(): threads the device holds at once (split_event_current);
//   static int forced_dw_route(), forced_dx_route(): 0, or a route of gpu_routes.h that replaces
//     the cost model's choice (the emulation tests force each route; 0 on the GPU);
//   static constexpr bool kHostReadsFlag: whether the error flag of the bound checks is read on
//     the host after a backward (the emulation: free; the GPU: no, it would synchronise).
//
// Host synchronisation (device -> host copies) happens only where a size must be known on the
// host to allocate an output: the number of input events (plus whether x is binary) in every
// forward, and the number of active entries in a sparse LIF forward. The backward ops never
// synchronise (ATen's sort, cumsum and GEMMs do not either).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <tuple>
#include <type_traits>

#include "cpu/cpu_common.h"  // Events, kEventDensityMax (the forward's current path, as the CPU's)
#include "op_checks.h"
#include "cuda/backward.cuh"
#include "cuda/compaction.cuh"
#include "cuda/csr.cuh"
#include "cuda/forward.cuh"
#include "cuda/neuron.cuh"  // the LIF neuron op's kernels (host code: neuron_host.h)
#include "cuda/gpu_routes.h"

namespace sparsegrad {
namespace cuda {
namespace host {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LifGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ReadoutForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ReadoutGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

using cpu::Events;

// A launch of one warp per item (the compaction kernels: SG_WARP_LOOP over rows).
template <class L, typename... KArgs, typename... Args>
void launch_warps(int64_t n_items, void (*kernel)(KArgs...), Args... args) {
  if (n_items <= 0) return;
  L::launch_in(L::warp_shape(n_items * kWarp), kernel, args...);
}

inline at::TensorOptions acc_options(const at::Tensor& like) {
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return like.options().dtype(acc);
}

// ------------------------------------------------------------------------------------------------
// Input events: count kernel, scan, one device->host copy (nnz and the binary flag), fill kernel.
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t>
Events build_events(const at::Tensor& x) {
  const int64_t T = x.size(0), B = x.size(1), N = x.size(2), R = B * T;
  const auto long_opts = x.options().dtype(at::kLong);
  Events ev;
  ev.ptr = at::zeros({R + 1}, long_opts);
  auto nonbinary = at::zeros({1}, long_opts);
  launch_warps<L>(R, &events_count_kernel<scalar_t>, x.data_ptr<scalar_t>(), T, B, N,
            ev.ptr.data_ptr<int64_t>(), nonbinary.data_ptr<int64_t>());
  ev.cnt = ev.ptr.narrow(0, 1, R).to(at::kInt);  // the op's output: per-row counts
  ev.ptr.cumsum_(0);
  const auto sizes = at::cat({ev.ptr.narrow(0, R, 1), nonbinary}).cpu();  // host sync: output size
  ev.nnz = sizes.data_ptr<int64_t>()[0];
  ev.binary = sizes.data_ptr<int64_t>()[1] == 0;
  ev.idx = at::empty({ev.nnz}, x.options().dtype(at::kInt));
  ev.val = at::empty({ev.binary ? 0 : ev.nnz}, x.options());
  launch_warps<L>(R, &events_fill_kernel<scalar_t>, x.data_ptr<scalar_t>(), T, B, N,
            ev.ptr.data_ptr<int64_t>(), ev.idx.data_ptr<int32_t>(),
            ev.binary ? static_cast<scalar_t*>(nullptr) : ev.val.data_ptr<scalar_t>());
  return ev;
}

template <typename scalar_t>
CsrView<scalar_t> csr_view(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& val) {
  CsrView<scalar_t> v;
  v.ptr = ptr.data_ptr<int64_t>();
  v.idx = idx.data_ptr<int32_t>();
  v.val = val.numel() > 0 ? val.data_ptr<scalar_t>() : nullptr;
  return v;
}

// The input current, as the CPU chooses it: from the events below kEventDensityMax input
// density, else from one GEMM (cuBLAS on the GPU) into a [T, B, N_out] buffer.
template <typename scalar_t>
struct CurrentPlan {
  at::Tensor weight_t, dense;
  InputCurrent<scalar_t> current;

  CurrentPlan(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
              const Events& ev) {
    const int64_t T = x.size(0), B = x.size(1), n_in = x.size(2), n_out = weight.size(0);
    const double density = x.numel() > 0 ? double(ev.nnz) / double(x.numel()) : 0.0;
    current.T = T;
    current.B = B;
    current.n_out = n_out;
    if (density <= cpu::kEventDensityMax) {
      weight_t = weight.t().contiguous();
      current.events = csr_view<scalar_t>(ev.ptr, ev.idx, ev.val);
      current.weight_t = weight_t.data_ptr<scalar_t>();
      current.bias = ptr_or_null<scalar_t>(bias);
    } else {
      auto x2 = x.reshape({T * B, n_in});
      dense = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
      current.dense = dense.data_ptr<scalar_t>();
    }
  }
};

// When a forward walk has too few threads to hide the event path's latency (split_event_current),
// compute every event current first (event_current_kernel) and point the walk at them as a dense
// current. `free_buffer`: a [T, B, N_out] buffer of the accumulation type that the walk may
// overwrite (the sparse LIF forward's V trace), or undefined (then one is allocated, if small
// enough). Returns the buffer, to be kept alive until the walk has run (undefined: not split).
template <class L, typename scalar_t>
at::Tensor split_if_small(InputCurrent<scalar_t>& current, const at::Tensor& x, const at::Tensor& free_buffer) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = current.T, B = current.B, n_out = current.n_out, n = T * B * n_out;
  at::Tensor buffer;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {  // the walk reads the buffer as scalar_t
    if (!current.dense && n > 0 &&
        split_event_current(B * n_out, L::resident_threads(), n * int64_t(sizeof(acc_t)), free_buffer.defined())) {
      buffer = free_buffer.defined() ? free_buffer : at::empty({T, B, n_out}, x.options());
      L::launch(n, &event_current_kernel<scalar_t>, current, buffer.data_ptr<scalar_t>());
      current.dense = buffer.data_ptr<scalar_t>();
    }
  }
  return buffer;
}

// ------------------------------------------------------------------------------------------------
// lif_forward
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t>
ForwardOutputs lif_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& v_init,
                                const c10::optional<at::Tensor>& s_init, double alpha,
                                double threshold, double b_th, double slope, bool sparse,
                                NeuronKinds kinds) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0), B = x.size(1), n_out = weight.size(0), R = B * T;
  const auto long_opts = x.options().dtype(at::kLong);
  const Events ev = build_events<L, scalar_t>(x);
  CurrentPlan<scalar_t> plan(x, weight, bias, ev);

  auto spikes = at::empty({T, B, n_out}, x.options());
  auto v_final = at::empty({B, n_out}, x.options());
  auto stats = at::zeros({3}, long_opts);
  at::Tensor v_trace, sg_dense = sparse ? at::empty({0}, x.options()) : at::empty({T, B, n_out}, x.options());

  LifForwardArgs<scalar_t> a;
  a.current = plan.current;
  a.T = T;
  a.B = B;
  a.n_out = n_out;
  a.alpha = static_cast<acc_t>(alpha);
  a.threshold = static_cast<acc_t>(threshold);
  a.slope = static_cast<acc_t>(slope);
  a.surrogate = kinds.surrogate;
  a.reset = kinds.reset;
  a.v_init = ptr_or_null<scalar_t>(v_init);
  a.s_init = ptr_or_null<scalar_t>(s_init);
  a.spikes = spikes.data_ptr<scalar_t>();
  a.v_final = v_final.data_ptr<scalar_t>();
  if (sparse) {
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      v_trace = plan.dense.defined() ? plan.dense : at::empty({T, B, n_out}, acc_options(x));
    } else {
      v_trace = at::empty({T, B, n_out}, acc_options(x));
    }
    a.v_trace = v_trace.data_ptr<acc_t>();  // reuses the GEMM buffer when there is one
  } else {
    a.sg_dense = sg_dense.data_ptr<scalar_t>();
  }
  // (the sparse forward's V buffer takes the currents: the walk overwrites each I with its V)
  const at::Tensor split_current = split_if_small<L, scalar_t>(a.current, x, sparse ? v_trace : at::Tensor());
  if (B * n_out > 0) {
    // One spike count per block, summed here (no same-address atomics in the kernel).
    const LaunchShape shape = L::walk_shape(B * n_out);
    auto partial = at::empty({shape.blocks}, long_opts);
    a.spike_partial = partial.data_ptr<int64_t>();
    L::launch_in(shape, &lif_forward_kernel<scalar_t>, a);
    stats.narrow(0, 0, 1).copy_(partial.sum(0, /*keepdim=*/true));
  }
  stats.narrow(0, 2, 1).fill_(ev.nnz);
  // Reset to zero: the spikes that reset V, bit-packed for the backward (op_schemas.h).
  const int64_t words = bit_words(n_out);
  const bool zero_reset = kinds.reset == kResetZero;
  at::Tensor rst_bits = zero_reset ? at::empty({T, B, words}, x.options().dtype(at::kInt))
                                   : at::empty({0}, x.options().dtype(at::kInt));
  if (zero_reset)
    launch_warps<L>(T * B * words, &reset_bits_kernel<scalar_t>, a.spikes, a.s_init, T, B, n_out,
              rst_bits.data_ptr<int32_t>());

  if (!sparse) {
    stats.narrow(0, 1, 1).fill_(T * B * n_out);
    auto empty_int = [&] { return at::empty({0}, x.options().dtype(at::kInt)); };
    return {spikes, v_final, empty_int(), empty_int(), sg_dense, empty_int(), empty_int(),
            at::empty({0}, x.options()), rst_bits, stats};
  }

  // Compact the active set: count kernel, scan, one device->host copy (its size), fill kernel.
  auto act_ptr = at::zeros({R + 1}, long_opts);
  launch_warps<L>(R, &active_count_kernel<acc_t>, v_trace.data_ptr<acc_t>(), T, B, n_out,
            static_cast<acc_t>(threshold), static_cast<acc_t>(b_th), act_ptr.data_ptr<int64_t>());
  const at::Tensor act_cnt = act_ptr.narrow(0, 1, R).to(at::kInt);
  act_ptr.cumsum_(0);
  const int64_t n_active = act_ptr[R].item<int64_t>();  // host sync: output size
  auto act_idx = at::empty({n_active}, x.options().dtype(at::kInt));
  auto act_sg = at::empty({n_active}, x.options());
  launch_warps<L>(R, &active_fill_kernel<scalar_t, acc_t>, v_trace.data_ptr<acc_t>(), T, B, n_out,
            static_cast<acc_t>(threshold), static_cast<acc_t>(b_th), static_cast<acc_t>(slope),
            int(kinds.surrogate), act_ptr.data_ptr<int64_t>(), act_idx.data_ptr<int32_t>(),
            act_sg.data_ptr<scalar_t>());
  stats.narrow(0, 1, 1).fill_(n_active);
  return {spikes, v_final, act_cnt, act_idx, act_sg, ev.cnt, ev.idx, ev.val, rst_bits, stats};
}

template <class L>
ForwardOutputs lif_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                           const c10::optional<at::Tensor>& bias_in,
                           const c10::optional<at::Tensor>& v_init_in,
                           const c10::optional<at::Tensor>& s_init_in,
                           const c10::optional<at::Tensor>& /*x_act_cnt: used by the backward*/,
                           const c10::optional<at::Tensor>& /*x_act_idx*/, double alpha,
                           double threshold, double b_th, double slope, bool sparse,
                           c10::string_view surrogate, c10::string_view reset) {
  const NeuronKinds kinds = check_lif_forward_args(x_in, weight_in, bias_in, v_init_in, s_init_in,
                                                   alpha, threshold, b_th, slope, surrogate, reset);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  ForwardOutputs out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsegrad_lif_forward_cuda", [&] {
    out = lif_forward_impl<L, scalar_t>(x, weight, contiguous(bias_in), contiguous(v_init_in),
                                        contiguous(s_init_in), alpha, threshold, b_th, slope, sparse,
                                        kinds);
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// Backward building blocks (kernels: csr.cuh, backward.cuh; routes: gpu_routes.h)
// ------------------------------------------------------------------------------------------------

// A CSR over rows r = b*T + t as the backward kernels read it.
struct DeviceCsr {
  at::Tensor off;  // int64 [R + 1] offsets, from the op's int32 per-row counts
  at::Tensor idx;  // int32 [n]
  at::Tensor row;  // int64 [n]: the row of each entry, -1 where the entry is unusable (skipped)
  int64_t n = 0;
};

// Offsets by a scan of the counts on the device (not csrc/compact.h's row_offsets, which checks
// CPU tensors on the host: the emulation must run the GPU's sequence), then bound checks and row
// expansion on the device (csr.cuh): nothing is read on the host, so no synchronisation; problems
// raise bits of `flag`.
template <class L>
DeviceCsr prepare_csr(const at::Tensor& cnt, const at::Tensor& idx, int64_t R, int64_t n_cols,
                      const at::Tensor& flag, int csr, const char* op, const char* cnt_name) {
  DeviceCsr c;
  c.idx = idx.contiguous();
  c.n = c.idx.numel();
  SG_CHECK(R > 0 || c.n == 0, op, cnt_name, "has no rows, but its index tensor has ", c.n, " entries");
  c.off = at::zeros({R + 1}, cnt.options().dtype(at::kLong));
  if (R > 0) c.off.narrow(0, 1, R).copy_(at::cumsum(cnt, 0, at::kLong));
  c.row = at::empty({c.n}, c.off.options());
  L::launch(R, &csr_check_rows_kernel<int64_t>, c.off.data_ptr<int64_t>(), R, c.n, flag.data_ptr<int32_t>(), csr);
  L::launch(c.n, &csr_expand_kernel<int64_t>, c.off.data_ptr<int64_t>(), R, c.idx.data_ptr<int32_t>(), c.n,
            n_cols, c.row.data_ptr<int64_t>(), flag.data_ptr<int32_t>(), csr);
  return c;
}

// Offsets a per-row kernel may follow whatever the counts held: clamped into [0, n] and made
// non-decreasing (a running max), so every row's range lies inside the index array. Where they
// differ from c.off, csr_check_rows_kernel has raised the flag and the results are poisoned.
inline at::Tensor safe_offsets(const DeviceCsr& c) {
  return std::get<0>(at::cummax(c.off.clamp(0, c.n), 0));
}

// The columns with every unusable entry (row -1: out of range) replaced by column 0, and the
// rows with -1 replaced by row 0, for kernels that index with them directly (results poisoned).
inline at::Tensor safe_columns(const DeviceCsr& c) {
  return at::where(c.row.ge(0), c.idx, at::zeros_like(c.idx));
}
inline at::Tensor safe_rows(const DeviceCsr& c) { return c.row.clamp_min(0); }

// The entries of a CSR regrouped by column: one stable sort (CUB radix sort through ATen on the
// GPU: deterministic), the segment bounds, and per sorted position its dense row and weight.
template <typename acc_t>
struct Grouped {
  at::Tensor seg_ptr, drow, w;
};

template <class L, typename acc_t, typename Weight>
Grouped<acc_t> group_by_column(const DeviceCsr& c, int64_t n_cols, int64_t T, int64_t B, const Weight& weight,
                               const at::TensorOptions& acc_opts) {
  Grouped<acc_t> g;
  const auto long_opts = c.row.options();
  g.seg_ptr = at::empty({n_cols + 1}, long_opts);
  g.drow = at::empty({c.n}, long_opts);
  g.w = at::empty({c.n}, acc_opts);
  at::Tensor keys, perm;
  std::tie(keys, perm) = at::sort(c.idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  keys = keys.contiguous();
  perm = perm.contiguous();
  L::launch(n_cols + 1, &column_bounds_kernel<int64_t>, keys.data_ptr<int32_t>(), c.n, n_cols,
            g.seg_ptr.template data_ptr<int64_t>());
  L::launch(c.n, &segment_entries_kernel<acc_t, Weight>, perm.data_ptr<int64_t>(), c.n,
            c.row.data_ptr<int64_t>(), T, B, weight, g.drow.template data_ptr<int64_t>(),
            g.w.template data_ptr<acc_t>());
  return g;
}

// out (seg_stride, k_stride) = scale * per segment sum of w * rows of D [*, K].
template <class L, typename acc_t>
void segment_sum(const Grouped<acc_t>& g, int64_t n_seg, int64_t K, const at::Tensor& D, at::Tensor& out,
                 int64_t seg_stride, int64_t k_stride, acc_t scale) {
  SegmentArgs<acc_t> a;
  a.n_seg = n_seg;
  a.K = K;
  a.seg_ptr = g.seg_ptr.template data_ptr<int64_t>();
  a.drow = g.drow.template data_ptr<int64_t>();
  a.w = g.w.template data_ptr<acc_t>();
  a.D = D.template data_ptr<acc_t>();
  a.out = out.template data_ptr<acc_t>();
  a.out_seg_stride = seg_stride;
  a.out_k_stride = k_stride;
  a.scale = scale;
  L::launch(n_seg * K, &segment_sum_kernel<acc_t>, a);
}

// The input events as a dense [T, B, N_in] in the accumulation type.
template <class L, typename scalar_t>
at::Tensor dense_events(const DeviceCsr& ev, const scalar_t* val, int64_t T, int64_t B, int64_t n_in,
                        const at::TensorOptions& acc_opts) {
  at::Tensor x = at::zeros({T, B, n_in}, acc_opts);
  L::launch(ev.n, &scatter_events_kernel<scalar_t>, ev.row.data_ptr<int64_t>(), ev.idx.data_ptr<int32_t>(),
            val, ev.n, T, B, n_in, x.data_ptr<at::opmath_type<scalar_t>>());
  return x;
}

// The dW route a caller asks for (dw_route: 0 auto, 1 events, 2 active entries); the emulation
// can force any GPU route (L::forced_dw_route(), tests only).
template <class L>
routes::Dw asked_dw(int64_t dw_route) {
  const int forced = L::forced_dw_route();
  if (forced != 0) return static_cast<routes::Dw>(forced);
  return dw_route == 1 ? routes::Dw::kEvents : dw_route == 2 ? routes::Dw::kActive : routes::Dw::kAuto;
}

template <class L>
routes::Dx asked_dx() {
  return static_cast<routes::Dx>(L::forced_dx_route());
}

template <typename scalar_t>
routes::Problem route_problem(int64_t T, int64_t B, int64_t n_in, int64_t n_out, int64_t nnz,
                              int64_t n_active, const c10::optional<at::Tensor>& prev_idx,
                              bool active_route_valid) {
  routes::Problem p;
  p.T = T;
  p.B = B;
  p.n_in = n_in;
  p.n_out = n_out;
  p.nnz = nnz;
  p.n_active = n_active;
  p.n_prev = prev_idx.has_value() ? prev_idx->numel() : -1;
  p.acc_bytes = int64_t(sizeof(at::opmath_type<scalar_t>));
  p.scalar_bytes = int64_t(sizeof(scalar_t));
  p.active_route_valid = active_route_valid;
  return p;
}

// The decay of the gradient trace: alpha, cut by the reset bits under reset-to-zero (rst_bits
// given: the backward ops know the reset only through them).
template <typename acc_t>
TraceDecay<acc_t> trace_decay(acc_t alpha, const c10::optional<at::Tensor>& rst_bits, int64_t B, int64_t n) {
  TraceDecay<acc_t> d;
  d.alpha = alpha;
  if (rst_bits.has_value()) {
    d.reset = kResetZero;
    d.rst = rst_bits->data_ptr<int32_t>();
    d.B = B;
    d.words = bit_words(n);
  }
  return d;
}

// The error flag of the bound checks (csr.cuh): on the GPU a set flag turns every gradient into
// NaN (poison_kernel, no host synchronisation); where the launcher can read device memory for free
// (the emulation: L::kHostReadsFlag) it raises an error naming the inconsistent arguments.
inline std::string flag_message(int bits, const char* const csr_names[3]) {
  std::string m;
  for (int c = 0; c < 3; ++c) {
    if (bits & (1 << (2 * c)))
      m += std::string(" ") + csr_names[c] + ": the row counts do not match the index array;";
    if (bits & (1 << (2 * c + 1)))
      m += std::string(" ") + csr_names[c] + ": an index is out of range or not ascending within its row;";
  }
  if (bits & kFlagArgmax) m += " argmax_t: a time step outside [0, num_steps);";
  if (bits & kFlagPoolIdx) m += " pool_idx: a winner offset outside [0, pool_k**2);";
  return m;
}

constexpr int64_t kPoisonThreads = 8 * kThreadsPerBlock;

template <class L, typename scalar_t>
void finish_with_flag(const at::Tensor& flag, std::initializer_list<at::Tensor> outputs, const char* op,
                      const char* const csr_names[3]) {
  PoisonArgs<scalar_t> a;
  TORCH_INTERNAL_ASSERT(outputs.size() <= size_t(kPoisonOutputs));
  int64_t total = 0, k = 0;
  for (const at::Tensor& t : outputs) {
    if (t.numel() > 0) {
      TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value);
      a.out[k] = t.data_ptr<scalar_t>();
      a.n[k] = t.numel();
      total += t.numel();
    }
    ++k;
  }
  a.flag = flag.data_ptr<int32_t>();
  L::launch(std::min(total, kPoisonThreads), &poison_kernel<scalar_t>, a, total);
  if constexpr (L::kHostReadsFlag) {
    const int bits = flag.item<int32_t>();
    TORCH_CHECK(bits == 0, "sparsegrad.", op, ": inconsistent compact tensors:", flag_message(bits, csr_names));
  }
}

// ------------------------------------------------------------------------------------------------
// lif_backward_sparse
//   1. deltas dL/dS * surrogate scattered into a zero-filled G [T, B, N_out] (acc), then one
//      reverse scan per (b, j) in place: G, db partials, dL/dV_init;
//   2. dW by the route of gpu_routes.h: events (segment sums over events grouped by input),
//      active (segment sums over active entries grouped by output, against the input trace), or
//      a GEMM G^T X;
//   3. dx: one dot product per producer entry, or the GEMM G W;
//   4. db: sum of the partials over b.
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t>
LifGrads lif_backward_sparse_impl(const at::Tensor& gS, const c10::optional<at::Tensor>& gV,
                                  const at::Tensor& weight, const at::Tensor& act_cnt,
                                  const at::Tensor& act_idx, const at::Tensor& act_sg,
                                  const at::Tensor& ev_cnt, const at::Tensor& ev_idx,
                                  const at::Tensor& ev_val, const c10::optional<at::Tensor>& prev_cnt,
                                  const c10::optional<at::Tensor>& prev_idx,
                                  const c10::optional<at::Tensor>& rst_bits, double alpha_in,
                                  bool need_dx, bool need_dw, bool need_db, bool need_dv,
                                  int64_t dw_route) {
  using acc_t = at::opmath_type<scalar_t>;
  const char* op = "lif_backward_sparse";
  static const char* const kNames[3] = {"act_cnt/act_idx", "ev_cnt/ev_idx", "prev_cnt/prev_idx"};
  const int64_t T = gS.size(0), B = gS.size(1), n_out = weight.size(0), n_in = weight.size(1), R = B * T;
  const auto opts = gS.options();
  const auto acc_opts = acc_options(gS);
  const acc_t alpha = static_cast<acc_t>(alpha_in);
  at::Tensor dx = at::empty({0}, opts), dw = at::empty({0}, opts), db = at::empty({0}, opts),
             dv = at::empty({0}, opts);
  if (!(need_dx || need_dw || need_db || need_dv)) return {dx, dw, db, dv};

  const at::Tensor flag = at::zeros({1}, opts.dtype(at::kInt));
  // reset to zero cuts the trace per neuron: the input-trace closed form of the active route fails
  const routes::Problem problem = route_problem<scalar_t>(T, B, n_in, n_out, ev_idx.numel(), act_idx.numel(),
                                                          prev_idx, /*active_route_valid=*/!rst_bits.has_value());
  const routes::Dw dw_r = need_dw ? routes::choose_dw(problem, asked_dw<L>(dw_route)) : routes::Dw::kAuto;
  const routes::Dx dx_r = need_dx ? routes::choose_dx(problem, asked_dx<L>()) : routes::Dx::kAuto;
  const bool need_G = need_dx || (need_dw && dw_r != routes::Dw::kActive);

  const DeviceCsr act = prepare_csr<L>(act_cnt, act_idx, R, n_out, flag, 0, op, "act_cnt");
  at::Tensor G, db_parts;
  if (need_G || need_db || need_dv) {
    G = at::zeros({T, B, n_out}, acc_opts);
    L::launch(act.n, &scatter_delta_kernel<scalar_t>, act.row.data_ptr<int64_t>(), act.idx.data_ptr<int32_t>(),
              act_sg.data_ptr<scalar_t>(), act.n, gS.data_ptr<scalar_t>(), T, B, n_out, G.data_ptr<acc_t>());
    ScanArgs<scalar_t> a;
    a.T = T;
    a.B = B;
    a.n = n_out;
    a.decay = trace_decay<acc_t>(alpha, rst_bits, B, n_out);
    a.g_init = ptr_or_null<scalar_t>(gV);
    a.G = G.data_ptr<acc_t>();
    if (need_db) {
      db_parts = at::empty({B, n_out}, acc_opts);
      a.db_parts = db_parts.data_ptr<acc_t>();
    }
    if (need_dv) {
      dv = at::empty({B, n_out}, opts);
      a.dv = dv.data_ptr<scalar_t>();
    }
    L::launch(B * n_out, &reverse_trace_kernel<scalar_t, BufferInject<acc_t>>, a, BufferInject<acc_t>{G.data_ptr<acc_t>()});
  }

  if (need_dw) {
    const DeviceCsr ev = prepare_csr<L>(ev_cnt, ev_idx, R, n_in, flag, 1, op, "ev_cnt");
    const scalar_t* val = ev_val.numel() > 0 ? ev_val.data_ptr<scalar_t>() : nullptr;
    at::Tensor dw_acc;
    if (dw_r == routes::Dw::kEvents) {
      const auto g = group_by_column<L, acc_t>(ev, n_in, T, B, EventWeight<scalar_t>{val}, acc_opts);
      dw_acc = at::empty({n_out, n_in}, acc_opts);
      segment_sum<L>(g, n_in, n_out, G, dw_acc, /*seg_stride=*/1, /*k_stride=*/n_in, acc_t(1));
    } else if (dw_r == routes::Dw::kActive) {
      at::Tensor X = dense_events<L, scalar_t>(ev, val, T, B, n_in, acc_opts);
      L::launch(B * n_in, &input_trace_kernel<acc_t>, X.data_ptr<acc_t>(), T, B, n_in, alpha);
      DeltaWeight<scalar_t> delta;
      delta.grad = gS.data_ptr<scalar_t>();
      delta.sg = act_sg.data_ptr<scalar_t>();
      delta.idx = act.idx.data_ptr<int32_t>();
      delta.B = B;
      delta.n_out = n_out;
      const auto g = group_by_column<L, acc_t>(act, n_out, T, B, delta, acc_opts);
      dw_acc = at::empty({n_out, n_in}, acc_opts);
      segment_sum<L>(g, n_out, n_in, X, dw_acc, /*seg_stride=*/n_in, /*k_stride=*/1, acc_t(1));
      // dL/dV_final reaches every earlier step through the trace: + gV^T X[T-1]
      if (gV.has_value() && T > 0) dw_acc.addmm_(gV->to(acc_opts.dtype()).t(), X[T - 1]);
    } else {
      const at::Tensor X = dense_events<L, scalar_t>(ev, val, T, B, n_in, acc_opts);
      dw_acc = at::mm(G.view({T * B, n_out}).t(), X.view({T * B, n_in}));
    }
    dw = dw_acc.to(opts.dtype()).contiguous();
  }

  if (need_dx) {
    // a given producer set is checked whichever route dx takes, as on the CPU
    DeviceCsr prev;
    if (prev_idx.has_value()) prev = prepare_csr<L>(*prev_cnt, *prev_idx, R, n_in, flag, 2, op, "prev_cnt");
    if (dx_r == routes::Dx::kDots) {
      const at::Tensor weight_t = weight.t().contiguous();
      at::Tensor dx_acc = at::zeros({T, B, n_in}, acc_opts);
      L::launch(prev.n, &entry_dot_kernel<scalar_t>, prev.row.data_ptr<int64_t>(), prev.idx.data_ptr<int32_t>(),
                prev.n, T, B, n_in, n_out, G.data_ptr<acc_t>(), weight_t.data_ptr<scalar_t>(), acc_t(1),
                dx_acc.data_ptr<acc_t>());
      dx = dx_acc.to(opts.dtype());
    } else {
      dx = at::mm(G.view({T * B, n_out}), weight.to(acc_opts.dtype())).view({T, B, n_in}).to(opts.dtype());
    }
  }

  if (need_db) {
    db = at::empty({n_out}, opts);
    L::launch(n_out, &column_sum_kernel<scalar_t>, db_parts.data_ptr<acc_t>(), B, n_out, acc_t(1),
              db.data_ptr<scalar_t>());
  }
  finish_with_flag<L, scalar_t>(flag, {dx, dw, db, dv}, op, kNames);
  return {dx, dw, db, dv};
}

template <class L>
LifGrads lif_backward_sparse(const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
                             const at::Tensor& weight, const at::Tensor& act_cnt,
                             const at::Tensor& act_idx, const at::Tensor& act_sg,
                             const at::Tensor& ev_cnt, const at::Tensor& ev_idx,
                             const at::Tensor& ev_val, const c10::optional<at::Tensor>& prev_cnt,
                             const c10::optional<at::Tensor>& prev_idx,
                             const c10::optional<at::Tensor>& rst_bits, double alpha, bool need_dx,
                             bool need_dw, bool need_db, bool need_dv, int64_t dw_route) {
  check_lif_backward_sparse_args(grad_spikes, grad_v_final, weight, act_cnt, act_idx, act_sg, ev_cnt,
                                 ev_idx, ev_val, prev_cnt, prev_idx, rst_bits, alpha, dw_route);
  c10::optional<at::Tensor> gV = contiguous(grad_v_final);
  const at::Tensor gS = grad_spikes.contiguous(), w = weight.contiguous();
  LifGrads out;
  AT_DISPATCH_FLOATING_TYPES(gS.scalar_type(), "sparsegrad_lif_backward_sparse_cuda", [&] {
    out = lif_backward_sparse_impl<L, scalar_t>(
        gS, gV, w, act_cnt, act_idx, act_sg.contiguous(), ev_cnt, ev_idx, ev_val.contiguous(), prev_cnt,
        prev_idx, contiguous(rst_bits), alpha, need_dx, need_dw, need_db, need_dv, dw_route);
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// lif_backward_dense: the reverse scan at every entry, then GEMMs (cuBLAS) and the db column sum.
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t>
LifGrads lif_backward_dense_impl(const at::Tensor& gS, const c10::optional<at::Tensor>& gV,
                                 const at::Tensor& x, const at::Tensor& weight, const at::Tensor& sg,
                                 const c10::optional<at::Tensor>& rst_bits, double alpha, bool need_dx,
                                 bool need_dw, bool need_db, bool need_dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gS.size(0), B = gS.size(1), n_in = weight.size(1), n_out = weight.size(0);
  const auto opts = gS.options();
  const auto acc_opts = acc_options(gS);
  at::Tensor dx = at::empty({0}, opts), dw = at::empty({0}, opts), db = at::empty({0}, opts),
             dv = at::empty({0}, opts);
  if (!(need_dx || need_dw || need_db || need_dv)) return {dx, dw, db, dv};
  const bool need_G = need_dx || need_dw;
  at::Tensor G = need_G ? at::empty({T, B, n_out}, acc_opts) : at::Tensor();
  at::Tensor db_parts = need_db ? at::empty({B, n_out}, acc_opts) : at::Tensor();
  ScanArgs<scalar_t> a;
  a.T = T;
  a.B = B;
  a.n = n_out;
  a.decay = trace_decay<acc_t>(static_cast<acc_t>(alpha), rst_bits, B, n_out);
  a.g_init = ptr_or_null<scalar_t>(gV);
  a.G = need_G ? G.data_ptr<acc_t>() : nullptr;
  a.db_parts = need_db ? db_parts.data_ptr<acc_t>() : nullptr;
  if (need_dv) {
    dv = at::empty({B, n_out}, opts);
    a.dv = dv.data_ptr<scalar_t>();
  }
  DenseInject<scalar_t> inject;
  inject.grad = gS.data_ptr<scalar_t>();
  inject.sg = sg.data_ptr<scalar_t>();
  L::launch(B * n_out, &reverse_trace_kernel<scalar_t, DenseInject<scalar_t>>, a, inject);
  if (need_G) {
    const at::Tensor G2 = G.view({T * B, n_out});
    if (need_dx) dx = at::mm(G2, weight.to(acc_opts.dtype())).view({T, B, n_in}).to(opts.dtype());
    if (need_dw) dw = at::mm(G2.t(), x.view({T * B, n_in}).to(acc_opts.dtype())).to(opts.dtype()).contiguous();
  }
  if (need_db) {
    db = at::empty({n_out}, opts);
    L::launch(n_out, &column_sum_kernel<scalar_t>, db_parts.data_ptr<acc_t>(), B, n_out, acc_t(1),
              db.data_ptr<scalar_t>());
  }
  return {dx, dw, db, dv};
}

template <class L>
LifGrads lif_backward_dense(const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
                            const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& sg_in,
                            const c10::optional<at::Tensor>& rst_bits, double alpha, bool need_dx,
                            bool need_dw, bool need_db, bool need_dv) {
  check_lif_backward_dense_args(grad_spikes, grad_v_final, x_in, weight_in, sg_in, rst_bits, alpha);
  const c10::optional<at::Tensor> gV = contiguous(grad_v_final);
  const at::Tensor gS = grad_spikes.contiguous(), x = x_in.contiguous(), w = weight_in.contiguous(),
                   sg = sg_in.contiguous();
  LifGrads out;
  AT_DISPATCH_FLOATING_TYPES(gS.scalar_type(), "sparsegrad_lif_backward_dense_cuda", [&] {
    out = lif_backward_dense_impl<L, scalar_t>(gS, gV, x, w, sg, contiguous(rst_bits), alpha, need_dx, need_dw,
                                               need_db, need_dv);
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// li_readout_forward / li_readout_backward
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t>
ReadoutForwardOutputs li_readout_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias, double alpha,
                                              int reduce) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0), B = x.size(1), n_out = weight.size(0);
  const Events ev = build_events<L, scalar_t>(x);
  CurrentPlan<scalar_t> plan(x, weight, bias, ev);
  auto out = reduce == kReduceNone ? at::empty({T, B, n_out}, x.options()) : at::empty({B, n_out}, x.options());
  const auto long_opts = x.options().dtype(at::kLong);
  auto argmax = reduce == kReduceMax ? at::empty({B, n_out}, long_opts) : at::empty({0}, long_opts);
  ReadoutForwardArgs<scalar_t> a;
  a.current = plan.current;
  a.T = T;
  a.B = B;
  a.n_out = n_out;
  a.alpha = static_cast<acc_t>(alpha);
  a.reduce = reduce;
  a.out = out.data_ptr<scalar_t>();
  a.argmax = reduce == kReduceMax ? argmax.data_ptr<int64_t>() : nullptr;
  const at::Tensor split_current = split_if_small<L, scalar_t>(a.current, x, at::Tensor());
  if (B * n_out > 0) L::launch_in(L::walk_shape(B * n_out), &li_readout_forward_kernel<scalar_t>, a);
  return {out, argmax, ev.cnt, ev.idx, ev.val};
}

template <class L>
ReadoutForwardOutputs li_readout_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                         const c10::optional<at::Tensor>& bias_in,
                                         const c10::optional<at::Tensor>& /*x_act_cnt*/,
                                         const c10::optional<at::Tensor>& /*x_act_idx*/,
                                         double alpha, c10::string_view reduce_name) {
  const int reduce = check_readout_forward_args(x_in, weight_in, bias_in, alpha, reduce_name);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const c10::optional<at::Tensor> bias = contiguous(bias_in);
  ReadoutForwardOutputs out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsegrad_li_readout_forward_cuda", [&] {
    out = li_readout_forward_impl<L, scalar_t>(x, weight, bias, alpha, reduce);
  });
  return out;
}

// The readout's backward: the reverse scan injects dL/dU from the time reduction; dW by events or
// GEMM (no active-entry route: every output carries gradient), dx by dots or GEMM, all scaled by
// (1 - alpha).
template <class L, typename scalar_t>
ReadoutGrads li_readout_backward_impl(const at::Tensor& grad_out, const at::Tensor& argmax,
                                      const at::Tensor& weight, const at::Tensor& ev_cnt,
                                      const at::Tensor& ev_idx, const at::Tensor& ev_val,
                                      const c10::optional<at::Tensor>& prev_cnt,
                                      const c10::optional<at::Tensor>& prev_idx, int64_t T,
                                      double alpha_in, int reduce, bool need_dx, bool need_dw,
                                      bool need_db) {
  using acc_t = at::opmath_type<scalar_t>;
  const char* op = "li_readout_backward";
  static const char* const kNames[3] = {"", "ev_cnt/ev_idx", "prev_cnt/prev_idx"};
  const int64_t B = grad_out.size(-2), n_out = weight.size(0), n_in = weight.size(1), R = B * T;
  const auto opts = grad_out.options();
  const auto acc_opts = acc_options(grad_out);
  const acc_t alpha = static_cast<acc_t>(alpha_in), scale = acc_t(1) - alpha;
  at::Tensor dx = at::empty({0}, opts), dw = at::empty({0}, opts), db = at::empty({0}, opts);
  if (!(need_dx || need_dw || need_db)) return {dx, dw, db};

  const at::Tensor flag = at::zeros({1}, opts.dtype(at::kInt));
  const routes::Problem problem = route_problem<scalar_t>(T, B, n_in, n_out, ev_idx.numel(), 0, prev_idx,
                                                          /*active_route_valid=*/false);
  const routes::Dw dw_r = need_dw ? routes::choose_dw(problem, asked_dw<L>(0)) : routes::Dw::kAuto;
  const routes::Dx dx_r = need_dx ? routes::choose_dx(problem, asked_dx<L>()) : routes::Dx::kAuto;
  const bool need_G = need_dx || need_dw;

  at::Tensor G = need_G ? at::empty({T, B, n_out}, acc_opts) : at::Tensor();
  at::Tensor db_parts = need_db ? at::empty({B, n_out}, acc_opts) : at::Tensor();
  ScanArgs<scalar_t> a;
  a.T = T;
  a.B = B;
  a.n = n_out;
  a.decay.alpha = alpha;
  a.G = need_G ? G.data_ptr<acc_t>() : nullptr;
  a.db_parts = need_db ? db_parts.data_ptr<acc_t>() : nullptr;
  ReadoutInject<scalar_t> inject;
  inject.grad = grad_out.data_ptr<scalar_t>();
  inject.argmax = reduce == kReduceMax ? argmax.data_ptr<int64_t>() : nullptr;
  inject.reduce = reduce;
  inject.per_step = reduce == kReduceMean ? acc_t(1) / acc_t(T) : acc_t(1);
  inject.T = T;
  inject.n_out = n_out;
  inject.flag = flag.data_ptr<int32_t>();
  L::launch(B * n_out, &reverse_trace_kernel<scalar_t, ReadoutInject<scalar_t>>, a, inject);

  if (need_dw) {
    const DeviceCsr ev = prepare_csr<L>(ev_cnt, ev_idx, R, n_in, flag, 1, op, "ev_cnt");
    const scalar_t* val = ev_val.numel() > 0 ? ev_val.data_ptr<scalar_t>() : nullptr;
    at::Tensor dw_acc;
    if (dw_r == routes::Dw::kGemm) {
      const at::Tensor X = dense_events<L, scalar_t>(ev, val, T, B, n_in, acc_opts);
      dw_acc = at::mm(G.view({T * B, n_out}).t(), X.view({T * B, n_in})).mul_(scale);
    } else {
      const auto g = group_by_column<L, acc_t>(ev, n_in, T, B, EventWeight<scalar_t>{val}, acc_opts);
      dw_acc = at::empty({n_out, n_in}, acc_opts);
      segment_sum<L>(g, n_in, n_out, G, dw_acc, /*seg_stride=*/1, /*k_stride=*/n_in, scale);
    }
    dw = dw_acc.to(opts.dtype()).contiguous();
  }
  if (need_dx) {
    // a given producer set is checked whichever route dx takes, as on the CPU
    DeviceCsr prev;
    if (prev_idx.has_value()) prev = prepare_csr<L>(*prev_cnt, *prev_idx, R, n_in, flag, 2, op, "prev_cnt");
    if (dx_r == routes::Dx::kDots) {
      const at::Tensor weight_t = weight.t().contiguous();
      at::Tensor dx_acc = at::zeros({T, B, n_in}, acc_opts);
      L::launch(prev.n, &entry_dot_kernel<scalar_t>, prev.row.data_ptr<int64_t>(), prev.idx.data_ptr<int32_t>(),
                prev.n, T, B, n_in, n_out, G.data_ptr<acc_t>(), weight_t.data_ptr<scalar_t>(), scale,
                dx_acc.data_ptr<acc_t>());
      dx = dx_acc.to(opts.dtype());
    } else {
      dx = at::mm(G.view({T * B, n_out}), weight.to(acc_opts.dtype())).mul_(scale).view({T, B, n_in}).to(opts.dtype());
    }
  }
  if (need_db) {
    db = at::empty({n_out}, opts);
    L::launch(n_out, &column_sum_kernel<scalar_t>, db_parts.data_ptr<acc_t>(), B, n_out, scale,
              db.data_ptr<scalar_t>());
  }
  finish_with_flag<L, scalar_t>(flag, {dx, dw, db}, op, kNames);
  return {dx, dw, db};
}

template <class L>
ReadoutGrads li_readout_backward(const at::Tensor& grad_out_in, const at::Tensor& argmax,
                                 const at::Tensor& weight_in, const at::Tensor& ev_cnt,
                                 const at::Tensor& ev_idx, const at::Tensor& ev_val,
                                 const c10::optional<at::Tensor>& prev_cnt,
                                 const c10::optional<at::Tensor>& prev_idx, int64_t num_steps,
                                 double alpha, c10::string_view reduce_name, bool need_dx,
                                 bool need_dw, bool need_db) {
  const int reduce = check_readout_backward_args(grad_out_in, argmax, weight_in, ev_cnt, ev_idx, ev_val,
                                                 prev_cnt, prev_idx, num_steps, alpha, reduce_name);
  ReadoutGrads out;
  AT_DISPATCH_FLOATING_TYPES(grad_out_in.scalar_type(), "sparsegrad_li_readout_backward_cuda", [&] {
    out = li_readout_backward_impl<L, scalar_t>(
        grad_out_in.contiguous(), argmax.contiguous(), weight_in.contiguous(), ev_cnt, ev_idx,
        ev_val.contiguous(), prev_cnt, prev_idx, num_steps, alpha, reduce, need_dx, need_dw, need_db);
  });
  return out;
}

}  // namespace host
}  // namespace cuda
}  // namespace sparsegrad
