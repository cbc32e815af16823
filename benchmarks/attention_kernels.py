"""Attention kernels at FramePack's shape: time, TFLOP/s and error of each one this GPU can run.

    python benchmarks/attention_kernels.py [--tokens 18624] [--out attention.json]

One transformer block's attention at the 640 bucket, window 9: batch 1, 24 heads of 128, about
18.6k tokens. Each kernel is timed with CUDA events (median of --iters after warm-up); the error is
the relative L2 against float32 attention computed for the first two heads. Kernels whose package
is missing or that refuse the shape are reported with the reason, not skipped silently.

Besides PyTorch's SDPA kernels it tries two 8-bit candidates that the app does not offer, to record
why: SageAttention 1 (INT8 QK^T in Triton; diffusers' "sage" backend needs SageAttention 2) and
cuDNN's fused FP8 attention through nvidia-cudnn-frontend (below).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


E4M3_MAX = 448.0
P_SCALE = 256.0  # the softmax probabilities (at most 1) times this use e4m3's range without overflow


class CudnnFP8Attention:
    """cuDNN's fused FP8 SDPA on (batch, heads, tokens, head_dim) tensors, one scale per tensor.

    On Hopper cuDNN writes the output in FP8 too (a bf16 output needs Blackwell): each output row is
    a convex combination of V's rows, so V's scale bounds it; it is widened back afterwards."""

    def __init__(self):
        import cudnn

        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        self.graphs = {}

    def _graph(self, shape, out_dtype, fp8_out):
        key = (tuple(shape), out_dtype, fp8_out)
        if key not in self.graphs:
            cudnn = self.cudnn
            b, h, s, d = shape
            stride = [h * s * d, s * d, d, 1]
            graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                                  compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
            qkv = [graph.tensor(name=n, dim=[b, h, s, d], stride=stride, data_type=cudnn.data_type.FP8_E4M3)
                   for n in ("q", "k", "v")]
            scalars = [graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)
                       for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
            o, _stats, amax_s, amax_o = graph.sdpa_fp8(
                q=qkv[0], k=qkv[1], v=qkv[2], descale_q=scalars[0], descale_k=scalars[1], descale_v=scalars[2],
                descale_s=scalars[3], scale_s=scalars[4], scale_o=scalars[5], generate_stats=False,
                attn_scale=1.0 / math.sqrt(d), use_causal_mask=False)
            o.set_output(True).set_dim([b, h, s, d]).set_stride(stride).set_data_type(
                cudnn.data_type.FP8_E4M3 if fp8_out else cudnn.data_type.BFLOAT16)
            for amax in (amax_s, amax_o):
                amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(
                    cudnn.data_type.FLOAT)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            graph.check_support()
            graph.build_plans()
            self.graphs[key] = (graph, qkv, scalars, o, amax_s, amax_o, graph.get_workspace_size())
        return self.graphs[key]

    @staticmethod
    def quantize(t):
        scale = (t.abs().amax().float() / E4M3_MAX).clamp_min(1e-12)
        return (t / scale).to(torch.float8_e4m3fn).contiguous(), scale.reshape(1, 1, 1, 1)

    def __call__(self, q, k, v):
        (q8, dq), (k8, dk), (v8, dv) = (self.quantize(t) for t in (q, k, v))
        return self.run_quantized(q8, k8, v8, dq, dk, dv, q.dtype)

    def run_quantized(self, q8, k8, v8, dq, dk, dv, out_dtype):
        fp8_out = torch.cuda.get_device_capability(q8.device)[0] < 10
        graph, qkv, scalars, o, amax_s, amax_o, workspace_size = self._graph(q8.shape, out_dtype, fp8_out)
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        one = torch.ones(1, 1, 1, 1, device=q8.device, dtype=torch.float32)
        pack = dict(zip(qkv, (q8, k8, v8)))
        pack.update(zip(scalars, (dq, dk, dv, one / P_SCALE, one * P_SCALE, 1 / dv if fp8_out else one)))
        out = torch.empty(q8.shape, device=q8.device, dtype=torch.float8_e4m3fn if fp8_out else out_dtype)
        pack.update({o: out, amax_s: torch.empty_like(one), amax_o: torch.empty_like(one)})
        graph.execute(pack, torch.empty(max(workspace_size, 1), device=q8.device, dtype=torch.uint8),
                      handle=self.handle)
        return out.to(out_dtype) * dv.to(out_dtype) if fp8_out else out


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def reference(q, k, v, heads=2, chunk=2048):
    """float32 attention for the first heads, in query chunks (a full score matrix is 1.4 GB a head)."""
    outs = []
    scale = 1 / math.sqrt(q.shape[-1])
    for h in range(heads):
        qh, kh, vh = (t[0, h].float() for t in (q, k, v))
        rows = [torch.softmax(qh[i:i + chunk] @ kh.T * scale, dim=-1) @ vh for i in range(0, qh.shape[0], chunk)]
        outs.append(torch.cat(rows))
    return torch.stack(outs)


def sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def sdpa_bshd(backend):
    """diffusers' layout: projections give (B, S, H, D), the native backend transposes to (B, H, S, D)."""
    def run(q, k, v):
        q2, k2, v2 = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q2, k2, v2)
    return run


def kernels():
    table = {"sdpa-default": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
             "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
             "sdpa-cudnn-bshd-strides": sdpa_bshd(SDPBackend.CUDNN_ATTENTION),
             "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
             "sdpa-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)}
    try:
        from sageattention import sageattn

        table["sage-1 (int8 QK, Triton)"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="HND")
    except Exception as exc:  # noqa: BLE001 - report what is missing
        table["sage-1 (int8 QK, Triton)"] = exc
    try:
        fp8 = CudnnFP8Attention()
        table["cudnn-fp8 (per-tensor e4m3)"] = fp8
        cache = {}

        def kernel_only(q, k, v):
            if "qkv" not in cache:
                cache["qkv"] = [fp8.quantize(t) for t in (q, k, v)]
            (q8, dq), (k8, dk), (v8, dv) = cache["qkv"]
            return fp8.run_quantized(q8, k8, v8, dq, dk, dv, q.dtype)

        table["cudnn-fp8, inputs already FP8"] = kernel_only
    except Exception as exc:  # noqa: BLE001
        table["cudnn-fp8 (per-tensor e4m3)"] = exc
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=18624)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    g = torch.Generator("cuda").manual_seed(0)
    shape = (1, args.heads, args.tokens, 128)
    q, k, v = (torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    # keys share a mean direction, as RoPE'd keys do
    k = k + 0.5 * torch.randn(1, args.heads, 1, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    ref = reference(q, k, v)
    flops = 4 * args.heads * args.tokens ** 2 * 128
    rows = {}
    for name, fn in kernels().items():
        if isinstance(fn, Exception):
            rows[name] = {"error": f"{type(fn).__name__}: {str(fn).splitlines()[0] if str(fn) else ''}"}
            print(f"{name:32s} unavailable: {rows[name]['error']}", flush=True)
            continue
        try:
            out = fn(q, k, v)
            seconds = timed(lambda: fn(q, k, v), args.iters)
        except Exception as exc:  # noqa: BLE001
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            print(f"{name:32s} failed: {rows[name]['error']}", flush=True)
            continue
        err = float((out[0, :2].float() - ref).norm() / ref.norm())
        rows[name] = {"ms": round(seconds * 1e3, 3), "tflops": round(flops / seconds / 1e12, 1), "rel_l2": err}
        print(f"{name:32s} {seconds * 1e3:8.2f} ms {flops / seconds / 1e12:7.1f} TFLOP/s  rel L2 {err:.2e}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "shape": list(shape), "kernels": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
