"""``python -m gemma4_flexring selfcheck [--quick] [--json] [--device D] [--kernel K]``.

One command that checks this install on whatever device is present:

- parity: the ring against the dense float64 reference (output and the three gradients) for
  every mask feature, head dims 64, 256 and 512, bfloat16 and float32, at P = 1; then at P = 2
  (and 3) through a *ring runner* (``RingRunner``: ``run(jobs, world_size) -> per-rank
  results``, ``--runner``): by default the simulated ring (``simulated.py``: every rank a
  thread of this process, on the device itself, so one GPU checks the multi-rank logic), or gloo
  ranks spawned on the CPU.
- compile and export: a Gemma 4 attention layer (``model.Gemma4Attention``) compiled with
  ``fullgraph=True`` and exported with a dynamic length, both compared with eager.
- speed: the chunk kernel (the ring at P = 1) against ``F.scaled_dot_product_attention`` with
  the same dense mask, forward, in TFLOP/s counted over allowed (query, key) pairs only.

The features are the scenario catalog's (``testing/cases.py``: ``FEATURES``). Errors are relative
to max(1, the reference's largest magnitude), bounded by the tolerance table's ``RING`` (parity) and
``COMPILED`` (compile and export). Each check says on stderr when it starts; the report follows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..api import ring_attention
from ..info import SequenceInfo
from ..kernels import default_kernel
from ..layout import Layout
from ..testing.cases import FEATURES, feature
from ..testing.launch import spawn
from ..testing.reference import reference_gradients, reference_mask
from ..testing.simulated import SimulatedGroup
from ..testing.tolerances import COMPILED, RING, relative_error


@dataclass(frozen=True)
class Job:
    """One parity check: the whole problem, seeded, so every rank builds the same tensors."""

    feature: str
    head_dim: int
    dtype: str  # "bfloat16", "float32", ...
    seq_len: int
    device: str
    kernel: str | None = None
    layout: str = "zigzag"
    batch: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def make_tensors(job: Job) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(job.seed)
    shapes = [(job.batch, h, job.seq_len, job.head_dim) for h in (job.q_heads, job.kv_heads, job.kv_heads, job.q_heads)]
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes)


def run_rank(rank: int, world_size: int, job: Job, group=None) -> list[torch.Tensor]:
    """This rank's (out, dq, dk, dv) of ``job`` on the CPU, in float64 for the comparison
    (``group`` None: the default group, or a world of one)."""
    spec, info = feature(job.feature, job.batch, job.seq_len)
    layout = Layout(job.layout, world_size)
    q, k, v, grad = make_tensors(job)
    local = [layout.shard(t, 2, rank).to(job.device, job.torch_dtype).requires_grad_(True) for t in (q, k, v)]
    out = ring_attention(*local, mask=spec, info=info, layout=layout, kernel=job.kernel,
                         group=group)
    out.backward(layout.shard(grad, 2, rank).to(job.device, job.torch_dtype))
    return [t.detach().cpu().double() for t in (out, *(x.grad for x in local))]


class RingRunner(Protocol):
    """Runs ``run_rank`` on ``world_size`` ranks: per-rank lists of results, one per job."""

    def __call__(self, jobs: list[Job], world_size: int) -> list[list[list[torch.Tensor]]]: ...


def local_runner(jobs: list[Job], world_size: int) -> list:
    """A world of one, in this process."""
    if world_size != 1:
        raise ValueError("local_runner runs a world of one")
    return [[run_rank(0, 1, job) for job in jobs]]


def _run_jobs(rank: int, world_size: int, jobs: list[Job]) -> list[list[torch.Tensor]]:
    """One gloo rank: ``run_rank`` of every job."""
    warnings.filterwarnings("ignore")
    return [run_rank(rank, world_size, job) for job in jobs]


def gloo_runner(jobs: list[Job], world_size: int) -> list:
    """``world_size`` gloo ranks spawned on the CPU (``testing.launch.spawn``; jobs must be on the CPU)."""
    return spawn(_run_jobs, world_size, jobs)


def simulated_runner(jobs: list[Job], world_size: int) -> list:
    """``world_size`` ranks as threads of this process on the job's device (``simulated.py``): the
    multi-rank logic on one GPU, or quickly on the CPU."""
    group = SimulatedGroup(world_size)
    return group.run(lambda rank, size: [run_rank(rank, size, job, group) for job in jobs])


RUNNERS: dict[str, RingRunner] = {"local": local_runner, "gloo": gloo_runner, "simulated": simulated_runner}


def reference(job: Job) -> list[torch.Tensor]:
    """Float64 (out, dq, dk, dv) of ``job`` on the whole sequence."""
    return reference_gradients(*make_tensors(job), *feature(job.feature, job.batch, job.seq_len))


def compare(jobs: list[Job], results: list, world_size: int) -> list[dict]:
    """One row per job: the largest relative error over out, dq, dk, dv, and whether it passes."""
    rows = []
    for index, job in enumerate(jobs):
        layout = Layout(job.layout, world_size)
        errors = {}
        for name, part, want in zip(("out", "dq", "dk", "dv"), range(4), reference(job)):
            got = layout.unshard([results[r][index][part] for r in range(world_size)], dim=2)
            errors[name] = float((got - want).abs().max() / max(1.0, float(want.abs().max())))
        worst = max(errors.values())
        rows.append({**asdict(job), "world_size": world_size, "max_rel_error": worst, "errors": errors,
                     "ok": worst <= RING[job.torch_dtype]})
    return rows


def parity(device: torch.device, head_dim: int, dtype: torch.dtype, seq_len: int = 64,
           kernel: str | None = None, features=FEATURES) -> dict:
    """P = 1 parity at one head dim and dtype for ``features``: {"ok", "rows"}."""
    jobs = [Job(f, head_dim, str(dtype).removeprefix("torch."), seq_len, str(device), kernel) for f in features]
    rows = compare(jobs, local_runner(jobs, 1), 1)
    return {"ok": all(r["ok"] for r in rows), "rows": rows}


def _timed(fn: Callable[[], object], repeat: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def speed(device: torch.device, seq_len: int, head_dim: int, dtype: torch.dtype, kernel: str | None,
          features=("causal", "sliding", "documents"), repeat: int = 3) -> list[dict]:
    """Forward TFLOP/s over allowed pairs (4 * D flops per allowed pair and head): ring at P = 1
    with ``kernel`` vs ``F.scaled_dot_product_attention`` with the same dense boolean mask."""
    rows = []
    batch, q_heads, kv_heads = 1, 8, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, q_heads, seq_len, head_dim, generator=g).to(device, dtype)
    k, v = (torch.randn(batch, kv_heads, seq_len, head_dim, generator=g).to(device, dtype) for _ in range(2))
    for name in features:
        spec, info = feature(name, batch, seq_len)
        info = SequenceInfo(shape=(batch, seq_len)) if info is None else info  # one object: plans reused
        allowed = reference_mask(spec, info, batch, seq_len).to(device)
        flops = 4 * head_dim * q_heads * int(allowed.sum())
        with torch.no_grad():
            ring_s = _timed(lambda: ring_attention(q, k, v, mask=spec, info=info, kernel=kernel), repeat)
            mask = allowed.unsqueeze(1)
            sdpa_s = _timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), repeat)
        rows.append({"feature": name, "seq_len": seq_len, "head_dim": head_dim, "dtype": str(dtype),
                     "allowed_fraction": float(allowed.float().mean()),
                     "ring_ms": ring_s * 1e3, "sdpa_ms": sdpa_s * 1e3,
                     "ring_tflops": flops / ring_s / 1e12, "sdpa_tflops": flops / sdpa_s / 1e12})
    return rows


def compile_and_export(device: torch.device, dtype: torch.dtype, backend: str) -> dict:
    """A Gemma 4 attention layer: compiled (fullgraph) and exported (dynamic length) vs eager."""
    from torch.export import Dim

    from ..testing.model import Gemma4Attention

    torch.manual_seed(0)
    layer = Gemma4Attention().to(device, dtype)
    result: dict = {"backend": backend}
    start = time.perf_counter()
    compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)
    errors = []
    for seq_len in (16, 24):
        hidden = torch.randn(2, seq_len, 32, device=device, dtype=dtype)
        errors.append(relative_error(compiled(hidden), layer(hidden)))
    result["compile_s"], result["compile_max_error"] = time.perf_counter() - start, max(errors)
    start = time.perf_counter()
    hidden = torch.randn(2, 16, 32, device=device, dtype=dtype)
    program = torch.export.export(layer, (hidden,), dynamic_shapes=({1: Dim("seq", min=4, max=4096)},))
    other = torch.randn(2, 40, 32, device=device, dtype=dtype)
    result["export_s"] = time.perf_counter() - start
    result["export_max_error"] = relative_error(program.module()(other), layer(other))
    result["ok"] = max(result["compile_max_error"], result["export_max_error"]) <= COMPILED[backend]
    return result



def log(message: str) -> None:
    """A progress line on stderr, at once (stdout carries the report, JSON with ``--json``)."""
    print(f"[selfcheck] {message}", file=sys.stderr, flush=True)


def run(quick: bool, device: torch.device, kernel: str | None, runner: str = "simulated") -> dict:
    """Every section in turn, each announced by ``log``: the report (see ``format_report``)."""
    started = time.perf_counter()
    timings: dict = {}
    report: dict = {"device": str(device), "kernel": kernel or default_kernel(device), "quick": quick,
                    "torch": torch.__version__, "machine": platform.machine(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    seq_len = 32 if quick else (256 if device.type == "cuda" else 64)
    checks = [(kernel, head_dim, dtype) for head_dim in (64, 256, 512) for dtype in (torch.bfloat16, torch.float32)]
    if device.type == "cpu" and not quick and kernel is None:
        # The flex kernel on CPU runs eagerly (slow): one dtype, every feature, two head dims.
        checks += [("flex", head_dim, torch.float32) for head_dim in (64, 256)]
    parity_rows = []
    for index, (check_kernel, head_dim, dtype) in enumerate(checks, start=1):
        log(f"parity P=1 {index}/{len(checks)}: {check_kernel or report['kernel']} D={head_dim} "
            f"{str(dtype).removeprefix('torch.')}, {len(FEATURES)} features, S={seq_len}")
        parity_rows += parity(device, head_dim, dtype, seq_len, check_kernel)["rows"]
    report["parity"] = parity_rows
    timings["parity_p1"] = time.perf_counter() - started
    multi = []
    for world_size in ((2,) if quick else (2, 3)):
        features = ("all", "bidirectional_window") if quick else FEATURES
        kernels = (None,) if quick else (None, "flex")
        dtypes = ("float32",) if quick else ("float32", "bfloat16")
        on = str(device) if runner == "simulated" else "cpu"  # gloo moves CPU tensors only
        jobs = [Job(f, 64, dtype, 12 * world_size * 2, on, k, layout)
                for f in features for dtype in dtypes for k in kernels for layout in ("contiguous", "zigzag")]
        log(f"parity P={world_size} on {runner} ranks: {len(jobs)} cases")
        multi += compare(jobs, RUNNERS[runner](jobs, world_size), world_size)
    report["multi_rank"] = multi
    report["runner"] = runner
    timings["multi_rank"] = time.perf_counter() - started - sum(timings.values())
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    log(f"compile ({backend}, fullgraph) and export (dynamic length) of a Gemma 4 attention layer")
    try:
        report["compile_export"] = compile_and_export(device, torch.float32, backend)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        report["compile_export"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    timings["compile_export"] = time.perf_counter() - started - sum(timings.values())
    bench_len = 256 if quick else (8192 if device.type == "cuda" else 2048)
    bench_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log(f"speed: ring at P=1 vs SDPA, forward, S={bench_len} D=256 {str(bench_dtype).removeprefix('torch.')}")
    report["speed"] = speed(device, bench_len, 256, bench_dtype, kernel, repeat=2 if quick else 3)
    report["ok"] = (all(r["ok"] for r in parity_rows + multi) and report["compile_export"]["ok"])
    timings["speed"] = time.perf_counter() - started - sum(timings.values())
    report["seconds"], report["section_seconds"] = time.perf_counter() - started, timings
    return report


def format_report(report: dict) -> str:
    lines = [f"gemma4_flexring selfcheck on {report['device']}"
             + (f" ({report['gpu']})" if report["gpu"] else "")
             + f", kernel {report['kernel']}, torch {report['torch']}{', quick' if report['quick'] else ''}"]
    groups: dict = {}
    for r in report["parity"]:
        key = (r["kernel"] or report["kernel"], r["head_dim"], r["dtype"])
        groups.setdefault(key, []).append(r)
    lines.append("parity, P=1 (every mask feature; worst relative error over out, dq, dk, dv):")
    for (kernel, head_dim, dtype), rows in groups.items():
        worst = max(rows, key=lambda r: r["max_rel_error"])
        bad = [r["feature"] for r in rows if not r["ok"]]
        lines.append(f"  {kernel:4} D={head_dim:<3} {dtype:8} {len(rows)} features  worst {worst['max_rel_error']:.2e}"
                     f" ({worst['feature']})  {'ok' if not bad else 'FAIL: ' + ', '.join(bad)}")
    by_world: dict = {}
    for r in report["multi_rank"]:
        by_world.setdefault(r["world_size"], []).append(r)
    for world_size, rows in by_world.items():
        bad = [f"{r['feature']}/{r['dtype']}/{r['layout']}/{r['kernel']}" for r in rows if not r["ok"]]
        worst = max(r["max_rel_error"] for r in rows)
        kernels = sorted({r["kernel"] or "default" for r in rows})
        where = "simulated ranks (threads, one device)" if report["runner"] == "simulated" else "gloo ranks on CPU"
        lines.append(f"parity, P={world_size} {where}: {len(rows)} cases (kernels {', '.join(kernels)}, "
                     f"both layouts)  worst {worst:.2e}  {'ok' if not bad else 'FAIL: ' + ', '.join(bad)}")
    ce = report["compile_export"]
    if "error" in ce:
        lines.append(f"compile + export: FAIL {ce['error']}")
    else:
        lines.append(f"compile ({ce['backend']}, fullgraph): {ce['compile_s']:.1f} s, max error {ce['compile_max_error']:.1e}; "
                     f"export (dynamic length): {ce['export_s']:.1f} s, max error {ce['export_max_error']:.1e}"
                     f"  {'ok' if ce['ok'] else 'FAIL'}")
    lines.append("speed, forward, TFLOP/s over allowed pairs (ring at P=1 vs SDPA with the same dense mask):")
    for r in report["speed"]:
        lines.append(f"  {r['feature']:10} S={r['seq_len']} D={r['head_dim']} {r['dtype'].removeprefix('torch.')}"
                     f" allowed {r['allowed_fraction']:.1%}: ring {r['ring_tflops']:.3f} ({r['ring_ms']:.1f} ms)"
                     f"  sdpa {r['sdpa_tflops']:.3f} ({r['sdpa_ms']:.1f} ms)")
    sections = ", ".join(f"{k} {v:.1f} s" for k, v in report["section_seconds"].items())
    lines.append(f"{'PASS' if report['ok'] else 'FAIL'} in {report['seconds']:.1f} s ({sections})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma4_flexring selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, P=2 only (CI, < 30 s on CPU)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--kernel", default=None, choices=["aten", "flex"], help="default: by device")
    parser.add_argument("--runner", default="simulated", choices=sorted(RUNNERS),
                        help="multi-rank ring runner (default: simulated, in this process on the device)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    report = run(args.quick, device, args.kernel, args.runner)
    print(json.dumps(report, indent=1, default=str) if args.json else format_report(report))
    return 0 if report["ok"] else 1
