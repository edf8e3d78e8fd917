"""Hyper-connection kernels for decoding on a CPU: the read, the write and the learned collapse of a few tokens, each
one call into a small C++ library built with the machine's C++ compiler when first needed.

Why not `torch.compile` here: a decoding step does 2 hyper-connections per layer plus the collapse, each a few
thousand flops, and a compiled call costs 45-80 us before any work on a 2-core CPU (dynamo's guards, the AOTAutograd
wrapper, and one buffer allocation per Sinkhorn iteration: 46 per read; AOTInductor's runner still costs ~50 us);
eagerly the Sinkhorn loop alone is ~80 small operators. One call here costs 13 us (write) to 27 us (read) in a loop,
the work included, 55-65 us inside a decoding step whose matmuls have flushed the caches (benchmarks/README.md). The
functions are forward only, for fp32 streams: `HyperConnectionKernels` in modeling_mhc.py uses them for
`hc_kernel="auto"` without autograd.

The library is built once per process into a temporary folder (a second's compile, and no cache to go stale across
machines or versions) with the compiler inductor uses (`torch._inductor.config.cpp.cxx`). If it cannot be built, one
line is logged and the callers use their other paths. This file is copied next to saved checkpoints with
modeling_mhc.py and imports only torch and transformers.
"""

from __future__ import annotations

import ctypes
import subprocess
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

# The same arithmetic as `read_streams` / `write_streams` / `collapse_learned` in modeling_mhc.py, per token, in fp32
# (dot products summed in fp32 vector lanes, as a BLAS does).
SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// mixes[i] = (fn[i] . flat) / rms(flat) for i < m, over the `width` = n * hidden values of one token's streams.
// Four rows at a time: four independent sums keep the vector adds busy (one sum waits on each add's latency).
void normalized_projection(const float* flat, const float* fn, int64_t m, int64_t width, float norm_eps,
                           float* mixes) {
    float square_sum = 0.0f;
#pragma omp simd reduction(+ : square_sum)
    for (int64_t c = 0; c < width; ++c) square_sum += flat[c] * flat[c];
    const float inverse_rms = 1.0f / std::sqrt(square_sum / static_cast<float>(width) + norm_eps);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        const float *row0 = fn + i * width, *row1 = row0 + width, *row2 = row1 + width, *row3 = row2 + width;
        float dot0 = 0.0f, dot1 = 0.0f, dot2 = 0.0f, dot3 = 0.0f;
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
        for (int64_t c = 0; c < width; ++c) {
            dot0 += row0[c] * flat[c];
            dot1 += row1[c] * flat[c];
            dot2 += row2[c] * flat[c];
            dot3 += row3[c] * flat[c];
        }
        mixes[i] = dot0 * inverse_rms;
        mixes[i + 1] = dot1 * inverse_rms;
        mixes[i + 2] = dot2 * inverse_rms;
        mixes[i + 3] = dot3 * inverse_rms;
    }
    for (; i < m; ++i) {
        const float* row = fn + i * width;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < width; ++c) dot += row[c] * flat[c];
        mixes[i] = dot * inverse_rms;
    }
}

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// out[c] = sum_j weights[j] * streams[j][c]
void weighted_sum(const float* weights, const float* streams, int64_t n, int64_t hidden, float* out) {
    for (int64_t c = 0; c < hidden; ++c) out[c] = weights[0] * streams[c];
    for (int64_t j = 1; j < n; ++j) {
        const float w = weights[j];
        const float* stream = streams + j * hidden;
        for (int64_t c = 0; c < hidden; ++c) out[c] += w * stream[c];
    }
}

// Sinkhorn in the comb frame, in place on the n x n logits (row-major): softmax over each row, + eps, then
// column-normalise; then `iterations - 1` times row- and column-normalise; every divisor is sum + eps.
void sinkhorn(float* comb, int64_t n, int64_t iterations, float eps) {
    for (int64_t i = 0; i < n; ++i) {
        float* row = comb + i * n;
        float top = row[0];
        for (int64_t j = 1; j < n; ++j) top = std::fmax(top, row[j]);
        float total = 0.0f;
        for (int64_t j = 0; j < n; ++j) total += (row[j] = std::exp(row[j] - top));
        for (int64_t j = 0; j < n; ++j) row[j] = row[j] / total + eps;
    }
    for (int64_t step = 0; step < 2 * iterations - 1; ++step) {
        const bool columns = step % 2 == 0;
        for (int64_t a = 0; a < n; ++a) {
            float total = 0.0f;
            for (int64_t b = 0; b < n; ++b) total += columns ? comb[b * n + a] : comb[a * n + b];
            const float divisor = total + eps;
            for (int64_t b = 0; b < n; ++b) (columns ? comb[b * n + a] : comb[a * n + b]) /= divisor;
        }
    }
}

}  // namespace

extern "C" {

// streams [tokens, n, hidden]; fn [n*n + 2n, n*hidden]; base [n*n + 2n]; scale [3]
// -> post [tokens, n], comb [tokens, n, n], collapsed [tokens, hidden]
void hc_read(const float* streams, const float* fn, const float* base, const float* scale, int64_t tokens, int64_t n,
             int64_t hidden, int64_t iterations, float eps, float norm_eps, float* post, float* comb,
             float* collapsed) {
    const int64_t m = n * n + 2 * n;
    std::vector<float> mixes(m), pre(n);
    for (int64_t t = 0; t < tokens; ++t) {
        const float* x = streams + t * n * hidden;
        normalized_projection(x, fn, m, n * hidden, norm_eps, mixes.data());
        float* token_post = post + t * n;
        float* token_comb = comb + t * n * n;
        for (int64_t j = 0; j < n; ++j) {
            pre[j] = sigmoid(mixes[j] * scale[0] + base[j]) + eps;
            token_post[j] = 2.0f * sigmoid(mixes[n + j] * scale[1] + base[n + j]);
        }
        for (int64_t k = 0; k < n * n; ++k) token_comb[k] = mixes[2 * n + k] * scale[2] + base[2 * n + k];
        sinkhorn(token_comb, n, iterations, eps);
        weighted_sum(pre.data(), x, n, hidden, collapsed + t * hidden);
    }
}

// streams [tokens, n, hidden]; output [tokens, hidden]; post [tokens, n]; comb [tokens, n, n]
// -> mixed [tokens, n, hidden]: mixed[k] = sum_j comb[j][k] streams[j] + post[k] output
void hc_write(const float* streams, const float* output, const float* post, const float* comb, int64_t tokens,
              int64_t n, int64_t hidden, float* mixed) {
    std::vector<float> weights(n);
    for (int64_t t = 0; t < tokens; ++t) {
        const float* x = streams + t * n * hidden;
        const float* y = output + t * hidden;
        for (int64_t k = 0; k < n; ++k) {
            for (int64_t j = 0; j < n; ++j) weights[j] = comb[t * n * n + j * n + k];
            float* out = mixed + (t * n + k) * hidden;
            weighted_sum(weights.data(), x, n, hidden, out);
            const float p = post[t * n + k];
            for (int64_t c = 0; c < hidden; ++c) out[c] += p * y[c];
        }
    }
}

// streams [tokens, n, hidden]; fn [n, n*hidden]; base [n]; scale [1] -> collapsed [tokens, hidden]
void hc_collapse(const float* streams, const float* fn, const float* base, const float* scale, int64_t tokens,
                 int64_t n, int64_t hidden, float eps, float norm_eps, float* collapsed) {
    std::vector<float> weights(n);
    for (int64_t t = 0; t < tokens; ++t) {
        const float* x = streams + t * n * hidden;
        normalized_projection(x, fn, n, n * hidden, norm_eps, weights.data());
        for (int64_t j = 0; j < n; ++j) weights[j] = sigmoid(weights[j] * scale[0] + base[j]) + eps;
        weighted_sum(weights.data(), x, n, hidden, collapsed + t * hidden);
    }
}

}
"""

FLAGS = ("-O3", "-fopenmp-simd", "-shared", "-fPIC")
POINTER, INT, FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "hc_read": [POINTER] * 4 + [INT] * 4 + [FLOAT] * 2 + [POINTER] * 3,
    "hc_write": [POINTER] * 4 + [INT] * 3 + [POINTER],
    "hc_collapse": [POINTER] * 4 + [INT] * 3 + [FLOAT] * 2 + [POINTER],
}


def build_library() -> ctypes.CDLL:
    """Compiles `SOURCE` with inductor's C++ compiler and loads it (raises on any failure)."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    with tempfile.TemporaryDirectory(prefix="hf_ext_mhc_") as folder:
        source, library_path = Path(folder, "hyper_connection.cpp"), Path(folder, "hyper_connection.so")
        source.write_text(SOURCE)
        result = subprocess.run([get_cpp_compiler(), *FLAGS, str(source), "-o", str(library_path)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(f"the C++ compiler failed: {(result.stderr.strip().splitlines() or ['?'])[-1][:300]}")
        library = ctypes.CDLL(str(library_path))  # loaded: the file itself may go with the folder
    for name, argtypes in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, None
    return library


# Tensor subclasses (fake, functional, quantized and other wrappers) may have no plain memory behind `data_ptr()`.
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


class CPUDecodeKernels:
    """The C++ read / write / collapse for fp32 streams on a CPU, without autograd. `ready()` builds the library on
    first use; when it cannot be built it logs one line and stays unavailable."""

    def __init__(self):
        self.library: ctypes.CDLL | None = None
        self.unavailable: str | None = None

    def ready(self) -> bool:
        if self.library is None and self.unavailable is None:
            try:
                self.library = build_library()
            except Exception as error:  # noqa: BLE001  (no compiler, a failed build or load: use the other paths)
                self.unavailable = f"{type(error).__name__}: {str(error).strip()[:300]}"
                logger.info(f"mHC: the CPU decoding kernels could not be built ({self.unavailable}); decoding uses "
                            "the compiled or eager hyper-connections")
        return self.library is not None

    def accepts(self, token_tensors: tuple, parameters: tuple) -> bool:
        """Whether a call may go to C: plain fp32 CPU tensors, the parameters contiguous, and nothing that records or
        transforms the computation (the caller checks autograd and the token count). Builds the library on first
        use."""
        tensors = (*token_tensors, *parameters)
        return (plain_eager_call()
                and all(type(tensor) in PLAIN_TENSOR_TYPES and tensor.dtype == torch.float32 and tensor.is_cpu
                        for tensor in tensors)
                and all(parameter.is_contiguous() for parameter in parameters)
                and self.ready())

    # The wrappers below are written for a few microseconds of Python per call: `shape[:-2].numel()`, for one, rather
    # than a view's `numel()` (~6 us on a slow CPU). Every tensor whose pointer goes to C is bound to a name for the
    # whole call (a temporary from `.contiguous()` would be freed as soon as `.data_ptr()` returned).

    def read(self, streams, fn, base, scale, iterations: int, eps: float, norm_eps: float):
        """`read_streams`: `(post [.., n], comb [.., n, n], collapsed [.., hidden])`."""
        lead, (n, hidden) = streams.shape[:-2], streams.shape[-2:]
        streams = streams.contiguous()
        post, comb = streams.new_empty(*lead, n), streams.new_empty(*lead, n, n)
        collapsed = streams.new_empty(*lead, hidden)
        self.library.hc_read(streams.data_ptr(), fn.data_ptr(), base.data_ptr(), scale.data_ptr(), lead.numel(), n,
                             hidden, iterations, eps, norm_eps, post.data_ptr(), comb.data_ptr(), collapsed.data_ptr())
        return post, comb, collapsed

    def write(self, streams, output, post, comb):
        """`write_streams`: the mixed streams, `[.., n, hidden]`."""
        lead, (n, hidden) = streams.shape[:-2], streams.shape[-2:]
        streams, output, post, comb = streams.contiguous(), output.contiguous(), post.contiguous(), comb.contiguous()
        mixed = torch.empty_like(streams)
        self.library.hc_write(streams.data_ptr(), output.data_ptr(), post.data_ptr(), comb.data_ptr(), lead.numel(),
                              n, hidden, mixed.data_ptr())
        return mixed

    def collapse(self, streams, fn, base, scale, eps: float, norm_eps: float):
        """`collapse_learned`: `[.., hidden]`."""
        lead, (n, hidden) = streams.shape[:-2], streams.shape[-2:]
        streams = streams.contiguous()
        collapsed = streams.new_empty(*lead, hidden)
        self.library.hc_collapse(streams.data_ptr(), fn.data_ptr(), base.data_ptr(), scale.data_ptr(), lead.numel(),
                                 n, hidden, eps, norm_eps, collapsed.data_ptr())
        return collapsed


def plain_eager_call() -> bool:
    """No tracer or transform is watching: a call into C would be invisible to `torch.jit.trace`, to dispatch modes
    (`make_fx`, fake tensors, FLOP counters), to torch-function modes, to functorch transforms (`vmap`, `grad`) and to
    forward-mode AD, which would then record or differentiate nothing. (Private torch APIs: where one is missing, the
    answer is no.)"""
    try:
        return not (torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
                    or torch._C._is_torch_function_mode_enabled()
                    or torch._C._functorch.maybe_current_level() is not None
                    or torch.autograd.forward_ad._current_level >= 0)
    except AttributeError:
        return False
