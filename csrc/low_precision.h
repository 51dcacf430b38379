// bfloat16 and float16 for every op, written once: an op whose floating tensors are all of one
// half type runs its float32 kernel on float32 copies of them, and its floating outputs are
// rounded back to that type. So neuron state and every sum are float32 and the results come out
// in the input dtype, on the CPU and the GPU alike; the kernels themselves dispatch on float and
// double only. Mixed dtypes are passed through unchanged, so the op's own checks name the
// argument that differs (nothing is silently converted).
//
// The wrapper also keeps torch.autocast out of the kernels: the ATen calls inside them (GEMMs,
// scans) must run in the dtype the kernel chose, not in autocast's (the Python layer casts the
// inputs of a layer to autocast's dtype before the op, see sparsegrad/functional.py).
//
// Use at registration: m.impl("op", SG_FLOAT32_MATH(op_kernel));
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <utility>

namespace sparsegrad {
namespace lowp {

// The dtype shared by the floating tensor arguments (none, or `mixed`).
struct FloatArgs {
  c10::optional<at::ScalarType> dtype;
  bool mixed = false;

  void add(const at::Tensor& t) {
    if (!t.defined() || !t.is_floating_point()) return;
    if (!dtype) dtype = t.scalar_type();
    else if (*dtype != t.scalar_type()) mixed = true;
  }
  void add(const c10::optional<at::Tensor>& t) {
    if (t.has_value()) add(*t);
  }
  template <typename T>
  void add(const T&) {}

  bool half_type() const {
    return dtype && !mixed && (*dtype == at::kHalf || *dtype == at::kBFloat16);
  }
};

inline at::Tensor widen(const at::Tensor& t) {
  return t.defined() && t.is_floating_point() ? t.to(at::kFloat) : t;
}
inline c10::optional<at::Tensor> widen(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(widen(*t)) : c10::nullopt;
}
template <typename T>
const T& widen(const T& v) {
  return v;
}

inline at::Tensor narrow(const at::Tensor& t, at::ScalarType dtype) {
  return t.defined() && t.is_floating_point() ? t.to(dtype) : t;
}
template <typename... Ts, size_t... I>
std::tuple<Ts...> narrow_each(std::tuple<Ts...>&& out, at::ScalarType dtype, std::index_sequence<I...>) {
  return std::tuple<Ts...>(narrow(std::get<I>(out), dtype)...);
}
template <typename... Ts>
std::tuple<Ts...> narrow(std::tuple<Ts...>&& out, at::ScalarType dtype) {
  return narrow_each(std::move(out), dtype, std::index_sequence_for<Ts...>{});
}

template <auto fn>
struct Float32Math;

template <typename R, typename... Args, R (*fn)(Args...)>
struct Float32Math<fn> {
  static R call(Args... args) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    FloatArgs floats;
    (floats.add(args), ...);
    if (!floats.half_type()) return fn(args...);
    return narrow(fn(widen(args)...), *floats.dtype);
  }
};

}  // namespace lowp
}  // namespace sparsegrad

#define SG_FLOAT32_MATH(fn) (&::sparsegrad::lowp::Float32Math<&fn>::call)
