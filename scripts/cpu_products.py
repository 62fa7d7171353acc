"""One decode-sized matrix product, PyTorch's CPU kernels against parloop's, side by side (docs/cpu.md reports a run).

    python scripts/cpu_products.py [--n 27648] [--k 5120] [--rows 1 2 3 4 8] [--threads 2] [--repeats 30]

For each row count M, `x[M, K] @ W[N, K]^T` with W in bf16 (`F.linear` against parloop's kernel), int8 per output
channel (`aten._weight_int8pack_mm` against parloop's) and int4 in groups of 128 (`aten._weight_int4pack_mm_for_cpu`
against parloop's): the median time of `--repeats` calls, the weight bytes read per second, and each path's time
over its own one-row time. The calls alternate between the paths, so load that comes and goes touches them alike.
The weight (283 MB in bf16 at the default shape) is far larger than the caches, as in a decode step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from parloop import cpu_kernels
from parloop.quant import quantize_int4, quantize_int8, unpack_int4

GROUP = 128


def products(n: int, k: int) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]:
    """name -> (function of x, weight bytes) for every path."""
    kernels = cpu_kernels.kernels()
    if kernels is None:
        raise SystemExit("parloop's CPU kernels do not run here (no AVX512-BF16, or the build failed)")
    w = (torch.randn(n, k) / k**0.5).to(torch.bfloat16)
    q8, q4 = quantize_int8(w), quantize_int4(w, GROUP)
    codes = unpack_int4(q4["weight"], GROUP).to(torch.int32)  # the same codes in aten's packing
    aten4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scale_zeros = torch.stack([q4["weight_scale"].t(), q4["weight_zero"].t()], dim=-1).contiguous()
    return {
        "bf16 F.linear": (lambda x: F.linear(x, w), 2 * n * k),
        "bf16 parloop": (lambda x: kernels.linear_bf16(x, w), 2 * n * k),
        "int8 aten": (lambda x: torch.ops.aten._weight_int8pack_mm(x, q8["weight"], q8["weight_scale"]), n * k),
        "int8 parloop": (lambda x: kernels.linear_int8(x, q8["weight"], q8["weight_scale"]), n * k),
        "int4 aten": (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, aten4, GROUP, scale_zeros), n * k // 2),
        "int4 parloop": (lambda x: kernels.linear_int4(x, q4["weight"], q4["weight_scale"], q4["weight_zero"], GROUP),
                         n * k // 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=27648, help="output size (the 7B's MLP: 27648)")
    parser.add_argument("--k", type=int, default=5120, help="input size (the 7B's hidden size: 5120)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = products(args.n, args.k)
    times: dict[tuple[str, int], float] = {}
    for rows in args.rows:
        x = torch.randn(rows, args.k).to(torch.bfloat16)
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.repeats + 3):
            for name, (product, _) in paths.items():
                start = time.perf_counter()
                product(x)
                samples[name].append(time.perf_counter() - start)
        for name in paths:
            times[name, rows] = statistics.median(samples[name][3:]) * 1e3
    print(f"{args.n} x {args.k} product, {args.threads} threads, median of {args.repeats}: "
          "ms (GB/s of weights, x its 1-row time)")
    print(f"{'path':<14}" + "".join(f"{f'M = {r}':>24}" for r in args.rows))
    for name, (_, nbytes) in paths.items():
        first = times[name, args.rows[0]]
        cells = [f"{times[name, r]:.2f} ({nbytes / times[name, r] / 1e6:.1f}, {times[name, r] / first:.2f}x)"
                 for r in args.rows]
        print(f"{name:<14}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
