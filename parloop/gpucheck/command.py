"""`scripts/gpu-check.sh OUTDIR`: every part in order, each stopped at its share, results written after each part."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from parloop.gpucheck.acceptance import acceptance
from parloop.gpucheck.parts import DRY_RUN_SHARES, PARTS, Options, Part, run_command
from parloop.gpucheck.summary import markdown

# what a part leaves in the scratch directory for the report: removed before it runs, so that a part stopped early
# is never reported with an earlier call's results (the study runs themselves stay, to be continued)
RESULT_FILES = {"tests": ("tests.xml",), "bench": ("bench.json",), "study": ("study.json", "study/report.md"),
                "reasoning": ("reasoning/report.md",)}


def card() -> str:
    """The GPU as nvidia-smi names it (without touching CUDA here, so this process holds no GPU memory)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "no GPU (nvidia-smi not found)"
    return out.stdout.strip().replace("\n", "; ") or "no GPU (nvidia-smi answered nothing)"


def _torch_version() -> str:
    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def tests_result(xml_path: Path) -> dict[str, Any]:
    """Counts and failed test names from pytest's JUnit XML."""
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return dict(total=counts["tests"], failed=counts["failures"] + counts["errors"], skipped=counts["skipped"],
                passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"], failures=failed)


def tests_from_log(log: Path) -> dict[str, Any]:
    """Counts from pytest's `-v` lines, for a run stopped before it wrote its XML (the tests not reached count as
    neither passed nor failed)."""
    outcomes = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", log.read_text(errors="replace"), re.M)
    failed = [name for name, outcome in outcomes if outcome in ("FAILED", "ERROR")]
    return dict(total=len(outcomes), failed=len(failed), skipped=sum(o == "SKIPPED" for _, o in outcomes),
                passed=sum(o == "PASSED" for _, o in outcomes), failures=failed, stopped=True)


def _copy_report(source: Path, target: Path) -> None:
    if source.is_file():
        shutil.copyfile(source, target)


def part_result(name: str, work: Path, out: Path) -> dict[str, Any] | None:
    """What a finished (or stopped) part left in `work`, as the report holds it; the study's report.md is copied
    to OUTDIR."""
    if name == "tests":
        xml, log = work / "tests.xml", out / "tests.log"
        return tests_result(xml) if xml.is_file() else tests_from_log(log) if log.is_file() else None
    if name == "bench" and (work / "bench.json").is_file():
        bench = json.loads((work / "bench.json").read_text())
        return {**bench, "acceptance": acceptance(bench)}
    if name in ("study", "reasoning"):
        _copy_report(work / name / "report.md", out / f"{name}-report.md")
    if name == "study" and (work / "study.json").is_file():
        return json.loads((work / "study.json").read_text())
    return None


def run_part(part: Part, work: Path, out: Path, options: Options) -> dict[str, Any]:
    share = DRY_RUN_SHARES[part.name] if options.dry_run else part.share(options)
    entry: dict[str, Any] = dict(status="skipped", estimate_s=part.estimate_s, share_s=share)
    missing = part.missing_modules()
    if missing:
        return {**entry, "reason": f"missing Python modules {', '.join(missing)}: run `scripts/gpu-check.sh "
                "--prepare` where a package registry is reachable and carry .whl (docs/gpu.md, 'What the check "
                "imports')"}
    started = time.perf_counter()
    for name in RESULT_FILES[part.name]:
        (work / name).unlink(missing_ok=True)
    print(f"== {part.name}: estimate {part.estimate_s:.0f} s on an H100, stopped after {share:.0f} s", flush=True)
    status, _, code = run_command(part.argv(work, share, options), out / f"{part.name}.log",
                                  share - (time.perf_counter() - started))
    seconds = time.perf_counter() - started
    entry.update(status=status, seconds=round(seconds, 1), exit_code=code,
                 result=part_result(part.name, work, out))
    print(f"   {part.name}: {status} in {seconds:.0f} s (log: {out / (part.name + '.log')})", flush=True)
    return entry


def _write(out: Path, report: dict[str, Any]) -> str:
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "gpu-check.md").write_text(text)
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("outdir", type=Path, help="where the results go: gpu-check.json, gpu-check.md, a log per "
                        "part and the studies' report.md (at most 8 files)")
    parser.add_argument("--part", nargs="+", choices=[*PARTS, "all"], default=["all"],
                        help="parts to run, in the fixed order tests, bench, study, reasoning")
    parser.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU with tiny shapes "
                        "(what the test suite runs)")
    parser.add_argument("--bench-batches", type=int, nargs="+", default=None, metavar="B",
                        help="batch sizes of the decode bench (default 1 16): a second call can measure those the "
                        "first had no time for")
    parser.add_argument("--bench-presets", nargs="+", choices=["1b", "100m"], default=None, metavar="PRESET",
                        help="presets of the decode bench (default 1b 100m)")
    parser.add_argument("--reasoning-full", action="store_true",
                        help="the reasoning part runs the whole GPU preset (3 seeds, learning-rate sweep; sized at 4-9 "
                        "min, stopped after 8) instead of its one-seed check that fits the 6-minute run: a call of its "
                        "own, e.g. `--part reasoning --reasoning-full` (docs/gpu.md)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "parloop-gpu-check",
                        help="scratch directory for the parts' own outputs (study runs, result files): a second "
                        "call with the same one continues a stopped study where it stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check.sh", description="Everything a GPU must show, in one "
                                     "command: the CUDA tests, the decode bench with its acceptance figures, the "
                                     "re-sized GPU study, and the reasoning track's GPU preset (docs/gpu.md).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    parts = [p for name, p in PARTS.items() if name in args.part or "all" in args.part]
    options = Options(args.dry_run, tuple(args.bench_batches) if args.bench_batches else None,
                      tuple(args.bench_presets) if args.bench_presets else None, args.reasoning_full)
    args.outdir.mkdir(parents=True, exist_ok=True)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = dict(started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), card=card(),
                                  python=sys.version.split()[0], torch=_torch_version(), dry_run=args.dry_run,
                                  work=str(work), parts={})
    total = sum(p.estimate_s for p in parts)
    print(f"GPU check on {report['card']}: " + ", ".join(f"{p.name} ~{p.estimate_s:.0f} s" for p in parts)
          + f"; about {total / 60:.1f} min on an H100", flush=True)
    for part in parts:
        report["parts"][part.name] = run_part(part, work, args.outdir, options)
        _write(args.outdir, report)
    print(_write(args.outdir, report))
    failed = [n for n, p in report["parts"].items() if p["status"] != "ok"]
    return 1 if failed else 0
