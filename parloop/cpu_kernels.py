"""parloop's decode-size CPU matrix products (`csrc/cpu_kernels.cpp`), compiled once per machine (docs/cpu.md).

A decode step multiplies 1 to 8 rows (its R stacked loop streams) by every weight. PyTorch's CPU kernels leave
bandwidth unused there (bf16: ~50 % of copy bandwidth for one row) and charge each extra row a fixed share of
arithmetic (int8/int4 weight-only); these kernels load each weight block once and multiply it into every row with
AVX512-BF16 or AVX512-VNNI dot products (docs/cpu.md has the side-by-side measurements that justify them).

They are built with `torch.utils.cpp_extension` the first time they are needed (about a minute; `scripts/setup.sh`
does it ahead) into `$PARLOOP_CACHE/kernels` (default `~/.cache/parloop/kernels`) and run only where the CPU has
AVX512-BF16 and AVX512-VNNI. Elsewhere, or with `PARLOOP_CPU_KERNELS=0`, or if the build fails (a warning says
why), the callers use PyTorch's own kernels: the same products, slower.
"""

from __future__ import annotations

import os
import sys
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.cpp_extension import load

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
MAX_ROWS = 8  # rows per kernel call (kMaxRows in the C++); callers split or route longer inputs
# -fopenmp: at::parallel_for is inline OpenMP code; without the flag it runs on one thread
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma"]
SWITCH = "PARLOOP_CPU_KERNELS"  # "0" turns the kernels off


def cache_dir() -> Path:
    root = Path(os.environ.get("PARLOOP_CACHE", Path.home() / ".cache" / "parloop"))
    return root / "kernels" / f"torch-{torch.__version__}"


@cache
def cpu_supported() -> bool:
    """Whether this CPU runs the kernels' instructions: AVX512-BF16 (which implies AVX512 F/BW/VL) and AVX512-VNNI
    (every CPU with AVX512-BF16 so far has it)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_vnni_supported")]
    return all(probe is not None and probe() for probe in probes)  # private helpers: absent means unknown, so no


def enabled() -> bool:
    """The kernels are wanted (not switched off) and this CPU can run them."""
    return os.environ.get(SWITCH, "1") != "0" and cpu_supported()


@cache
def _build() -> ModuleType | None:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        print("parloop: compiling the CPU decode kernels (once per machine, about a minute)...", file=sys.stderr,
              flush=True)
    # ninja comes with parloop's dependencies, into this interpreter's bin folder, which need not be on PATH
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    try:
        return load(name="parloop_cpu_kernels", sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                    build_directory=str(directory), verbose=False)
    except (OSError, RuntimeError, ImportError) as error:  # no compiler, no ninja, a failed compile
        warnings.warn(f"parloop: the CPU decode kernels did not build ({error}); decoding falls back to "
                      f"PyTorch's kernels (the same products, slower). Set {SWITCH}=0 to silence this.", stacklevel=3)
        return None


def kernels() -> ModuleType | None:
    """The compiled kernels, building them if needed; None where they cannot run here (see the module doc)."""
    return _build() if enabled() else None


def fits(x: torch.Tensor) -> bool:
    """Whether a product with `x` (any leading shape, inputs last) is decode-sized work for these kernels: on the
    CPU, 1..MAX_ROWS rows (the kernels have no backward: callers also check that no gradient is wanted)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.device.type == "cpu" and 1 <= rows <= MAX_ROWS


def report_build() -> None:
    """Build the kernels now and say so (scripts/setup.sh runs this)."""
    if not cpu_supported():
        print("parloop: this CPU lacks AVX512-BF16 or AVX512-VNNI; decoding uses PyTorch's kernels")
    else:
        print("parloop: CPU decode kernels " + ("ready" if kernels() is not None else "NOT built (see the warning)"))
