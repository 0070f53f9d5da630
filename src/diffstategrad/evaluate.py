"""Batch evaluation: a grid of (image, task, solver, with/without DiffStateGrad, guidance scale,
seed) items, run sequentially, on local worker processes or on a Ray cluster, written one JSON
line per item to ``records.jsonl`` (resumable), then aggregated into ``summary.csv`` /
``summary.md`` and the robustness figures.

The item runner (``diffstategrad.pipeline.evaluate_items``) is a plain module-level function of
(items, context) so that every backend runs exactly the same code. ``open_evaluation`` takes the
folder's lock, checks that a resumed run is the same experiment and opens the record store.

Backends (``run_items``): in this process; ``workers`` local processes; one local process per
device of ``devices`` (``--devices cuda:0,cuda:1``: each worker gets ``context.on_device(d)``);
a Ray cluster (one task per batch; with ``devices``, as many tasks at a time as devices, each
asking Ray for one GPU when they are CUDA devices). Every record is the same whichever backend
ran it (per-sample results depend on neither the batch nor the worker).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import os
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from diffstategrad.records import SETTINGS_FILE, RECORDS_FILE, FolderLock, RecordStore, atomic_write_text, batch_key, item_key

__all__ = ["EvalItem", "EvaluationSettingsError", "make_grid", "item_key", "batch_key", "batch_items", "open_evaluation", "run_items",
           "summarize", "write_summary", "robustness_figure"]

METRICS = ("psnr", "ssim", "lpips")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False}


@dataclass(frozen=True)
class EvalItem:
    image: str
    task: str
    solver: str
    diffstategrad: bool
    guidance_multiplier: float  # a multiple of the solver's preset default (1 = the default)
    seed: int

    @property
    def key(self) -> str:
        return item_key(asdict(self))


def make_grid(images: Sequence[str], tasks: Sequence[str], solvers: Sequence[str], guidance_multipliers: Sequence[float], seeds: Sequence[int],
              projector: Sequence[bool] = (False, True), skip: Sequence[tuple[str, str]] = ()) -> list[EvalItem]:
    """Every combination, ordered so that partial runs cover whole (task, solver) cells early;
    ``projector`` lists which of without (False) / with (True) DiffStateGrad to run. Classical
    solvers (no prior, no guidance) get one multiplier (1) and no DiffStateGrad variant.
    ``skip`` lists (task, solver) cells left out (see :func:`unsupported_cells`)."""
    from diffstategrad.solvers import solver_spec

    items = []
    for task, solver in itertools.product(tasks, solvers):
        if (task, solver) in set(skip):
            continue
        classical = not solver_spec(solver).needs_prior
        for scale, seed, image, dsg in itertools.product((1.0,) if classical else guidance_multipliers, seeds, images,
                                                         (False,) if classical else tuple(projector)):
            items.append(EvalItem(image, task, solver, dsg, float(scale), int(seed)))
    return items


def unsupported_cells(tasks: Sequence[str], solvers: Sequence[str], size: int = 64) -> list[tuple[str, str]]:
    """The (task, solver) cells that cannot run: a linear-only solver (the pseudo-inverse) on a
    task whose operator is nonlinear (hdr, phase retrieval, nonlinear deblurring)."""
    from diffstategrad.operators import load_task
    from diffstategrad.solvers import solver_spec

    linear_only = [s for s in solvers if solver_spec(s).linear_only]
    if not linear_only:
        return []
    nonlinear = [t for t in tasks if not load_task(t).build((3, size, size), seeds=[0]).operator.linear]
    return [(t, s) for t in nonlinear for s in linear_only]


class EvaluationSettingsError(ValueError):
    """A folder holds an evaluation with other settings."""


def open_evaluation(out_dir: Path, settings: dict) -> tuple[RecordStore, FolderLock]:
    """Lock ``out_dir`` for this process (``FolderInUseError`` if another holds it), check that
    a folder being resumed holds the same experiment (``settings``; the image set may grow) and
    open its record store. The caller releases the lock."""
    import json

    out_dir = Path(out_dir)
    lock = FolderLock(out_dir).acquire()
    try:
        path = out_dir / SETTINGS_FILE
        if path.exists():
            previous = json.loads(path.read_text())
            changed = sorted(k for k in set(settings) | set(previous) if previous.get(k) != settings.get(k))
            if changed:
                raise EvaluationSettingsError(f"{out_dir} holds an evaluation with other settings ({', '.join(changed)}); use another --out")
        atomic_write_text(path, json.dumps(settings, indent=2))
        return RecordStore(out_dir / RECORDS_FILE, item_key), lock
    except BaseException:
        lock.release()
        raise


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def batch_items(items: Sequence[dict], batch: int) -> list[list[dict]]:
    """Group items that differ only by image into batches of at most ``batch``: one solver call
    runs them together (per-sample results do not depend on the batch)."""
    groups: dict[tuple, list[dict]] = {}
    for it in items:
        groups.setdefault(batch_key(it), []).append(it)
    return [g[i : i + batch] for g in groups.values() for i in range(0, len(g), max(1, batch))]


def run_items(
    items: Sequence[EvalItem],
    runner: Callable[[list, dict], list],
    context: dict,
    store: RecordStore,
    workers: int = 1,
    ray_address: str | None = None,
    progress: bool = True,
    batch: int = 1,
    devices: Sequence[str] | None = None,
) -> int:
    """Run the items not yet in ``store`` and append their records as they finish.

    ``runner(items, context) -> records`` takes a batch of item dicts that differ only by image
    and must be a module-level function (it is pickled for worker processes and Ray). With
    ``devices``, one worker per device runs with ``context.on_device(device)`` (``workers``
    must then be 1); on Ray, as many tasks at a time as devices, each with one GPU when the
    devices are CUDA devices (Ray picks the GPU, which the task sees as ``cuda``). Returns the
    number of new records.
    """
    devices = tuple(devices or ())
    if devices and workers > 1:
        raise ValueError("devices runs one worker per device; leave workers at 1")
    todo = batch_items([asdict(it) for it in items if it.key not in store], batch)
    bar = tqdm(total=len(items), initial=len(items) - sum(map(len, todo)), desc="evaluate", disable=not progress, unit="item")
    written = 0

    def accept(records: list) -> None:
        nonlocal written
        for record in records:
            written += store.append(record)
        last = records[-1]
        bar.set_postfix(last=f"{last['task']}/{last['solver']} psnr {last.get('psnr') or float('nan'):.2f}")
        bar.update(len(records))

    try:
        if ray_address:
            _run_ray(todo, runner, context, ray_address, accept, devices)
        elif len(devices) > 1:
            _run_processes(todo, runner, [context.on_device(d) for d in devices], accept)
        elif workers > 1:
            _run_processes(todo, runner, [context] * workers, accept)
        else:
            here = context.on_device(devices[0]) if devices else context
            for group in todo:
                accept(runner(group, here))
    finally:
        bar.close()
    return written


def _run_processes(todo, runner, contexts, accept):
    """One worker process per entry of ``contexts`` (its own single-process pool, so that a
    worker keeps its context, e.g. its device, for the whole run); each takes the next batch
    as soon as it has finished one."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    pools = [concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_exit_with_parent, initargs=(os.getpid(),))
             for _ in contexts]
    queue = list(reversed(todo))
    pending = {}  # future -> worker index
    try:
        for k, pool in enumerate(pools):
            if queue:
                pending[pool.submit(runner, queue.pop(), contexts[k])] = k
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                k = pending.pop(fut)
                records = fut.result()
                if queue:
                    pending[pools[k].submit(runner, queue.pop(), contexts[k])] = k
                accept(records)
    except BaseException:
        # interrupted (Ctrl-C, SIGTERM, a failing item): stop the workers now instead of waiting
        # for their current batches; finished records are already on disk
        processes = [proc for pool in pools for proc in (getattr(pool, "_processes", None) or {}).values()]
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            if proc.is_alive():
                proc.terminate()
        for proc in processes:
            proc.join(timeout=10)
        raise
    for pool in pools:
        pool.shutdown(wait=True)


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: a worker whose parent process died (e.g. SIGKILL) exits within a
    second instead of computing results nobody will record."""
    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _run_ray(todo, runner, context, address, accept, devices=()):
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("--ray needs the ray package: pip install 'ray[default]'") from exc
    started_here = not ray.is_initialized()
    if started_here:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        if devices:
            # one task per device at a time; a CUDA task gets one GPU, chosen by Ray (it sets the
            # task's CUDA_VISIBLE_DEVICES, so the task sees its GPU as "cuda")
            cuda = str(devices[0]).split(":")[0] == "cuda"
            gpus, limit = (1 if cuda else 0), len(devices)
            context = context.on_device("cuda" if cuda else devices[0])
        else:
            gpus, limit = (1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0), len(todo)
        remote = ray.remote(num_gpus=gpus, num_cpus=1)(runner)
        queue, pending = list(reversed(todo)), []
        while queue or pending:
            while queue and len(pending) < limit:
                pending.append(remote.remote(queue.pop(), context))
            done, pending = ray.wait(pending, num_returns=1)
            accept(ray.get(done[0]))
    finally:
        if started_here:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------

CELL = ("task", "solver", "diffstategrad", "guidance_multiplier")


def _present(rs, key) -> list[float]:
    return [float(r[key]) for r in rs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
            and math.isfinite(float(r[key]))]


def summarize(records) -> list[dict]:
    """One row per (task, solver, projector, scale): n, mean / std / worst of each metric,
    failure rate, and what the items cost: mean seconds (solver) and wall_seconds (whole item)
    per image, mean network_calls and autoencoder_calls, mean and largest peak_memory_mb (with
    its kind). Records written before the cost fields existed give NaN there (and "-" in
    summary.md). Failed samples are included with their (frozen) outputs."""
    from diffstategrad.records import guidance_multiplier

    cells = defaultdict(list)
    for r in records:
        r = {**r, "guidance_multiplier": guidance_multiplier(r)}
        cells[tuple(r[k] for k in CELL)].append(r)
    rows = []
    for cell, rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], kv[0][2])):
        row = dict(zip(CELL, cell))
        row["n"] = len(rs)
        for m in METRICS + tuple(f"mean_{m}" for m in METRICS if any(f"mean_{m}" in r for r in rs)):
            values = [float(r[m]) for r in rs if r.get(m) is not None and math.isfinite(float(r[m]))]  # LPIPS may be absent
            row[f"{m}_mean"] = statistics.fmean(values) if values else float("nan")
            row[f"{m}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
            higher = HIGHER_IS_BETTER[m.removeprefix("mean_")]
            row[f"{m}_worst"] = (min(values) if higher else max(values)) if values else float("nan")
            row[f"{m}_p05"] = _percentile(values, 5 if higher else 95)
        row["failure_rate"] = sum(bool(r.get("failed")) for r in rs) / len(rs)
        row["seconds_mean"] = statistics.fmean(float(r.get("seconds", 0.0)) for r in rs)
        for key in ("wall_seconds", "network_calls", "autoencoder_calls", "peak_memory_mb"):
            values = _present(rs, key)
            row[f"{key}_mean"] = statistics.fmean(values) if values else float("nan")
        memory = _present(rs, "peak_memory_mb")
        row["peak_memory_mb_max"] = max(memory) if memory else float("nan")
        row["peak_memory_kind"] = "/".join(sorted({str(r["peak_memory_kind"]) for r in rs if r.get("peak_memory_kind")})) or None
        rows.append(row)
    return rows


def _percentile(values, q: float) -> float:
    """The q-th percentile (linear interpolation) of ``values``; the worst-case 5 % for PSNR is
    q = 5, for LPIPS (lower is better) q = 95."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    return "-" if math.isnan(mean) else f"{mean:.{digits}f} +- {std:.{digits}f}"


def _number(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _memory(row: dict) -> str:
    """The cell's largest peak memory and where it was measured (CUDA allocated / CPU RSS)."""
    text = _number(row.get("peak_memory_mb_max"), ".0f")
    kind = {"cuda_max_allocated": "CUDA", "cpu_max_rss": "CPU RSS"}.get(row.get("peak_memory_kind") or "", row.get("peak_memory_kind"))
    return text if text == "-" or not kind else f"{text} ({kind})"


def _needs_prior(solver: str) -> bool:
    from diffstategrad.solvers import solver_spec

    try:
        return solver_spec(solver).needs_prior
    except ValueError:  # a solver of an older version: treat it as a diffusion solver
        return True


def write_summary(rows: list[dict], out_dir: Path) -> None:
    """``summary.csv`` (every column) and ``summary.md`` (mean +- std, the posterior mean's
    scores when there are several samples, worst and 5th-percentile PSNR, failure rate, seconds
    per image, mean network calls and the largest peak memory of the cell)."""
    out_dir = Path(out_dir)
    if not rows:
        atomic_write_text(out_dir / "summary.csv", "")
        atomic_write_text(out_dir / "summary.md", "no records yet\n")
        return
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "summary.csv", buf.getvalue())

    with_mean = any("mean_psnr_mean" in r for r in rows)
    head = "| task | solver | DiffStateGrad | guidance (x default) | n | PSNR | SSIM | LPIPS |"
    if with_mean:
        head += " PSNR of the mean | LPIPS of the mean |"
    head += " worst PSNR | 5th pct PSNR | failure rate | s / image | network calls | peak memory (MiB) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        classical = not _needs_prior(r["solver"])
        line = (f"| {r['task']} | {r['solver']} | {'-' if classical else ('yes' if r['diffstategrad'] else 'no')} "
                f"| {'-' if classical else format(r['guidance_multiplier'], 'g')} | {r['n']} "
                f"| {r['psnr_mean']:.2f} +- {r['psnr_std']:.2f} | {r['ssim_mean']:.3f} +- {r['ssim_std']:.3f} "
                f"| {_fmt(r['lpips_mean'], r['lpips_std'])} |")
        if with_mean:
            line += (f" {_fmt(r.get('mean_psnr_mean', float('nan')), r.get('mean_psnr_std', 0.0), 2)} "
                     f"| {_fmt(r.get('mean_lpips_mean', float('nan')), r.get('mean_lpips_std', 0.0))} |")
        line += f" {r['psnr_worst']:.2f} | {r['psnr_p05']:.2f} | {r['failure_rate']:.0%} | {r['seconds_mean']:.2f} |"
        line += f" {_number(r.get('network_calls_mean'), 'g')} | {_memory(r)} |"
        lines.append(line)
    atomic_write_text(out_dir / "summary.md", "\n".join(lines) + "\n")


def robustness_figure(rows: list[dict], path: Path, metric: str = "psnr") -> None:
    """The paper's robustness plot: ``metric`` against the guidance scale, with and without
    DiffStateGrad, one panel per (task, solver); error bars are one standard deviation."""
    from diffstategrad.figures import grid_for, panel_grid

    panels = sorted({(r["task"], r["solver"]) for r in rows if _needs_prior(r["solver"])})
    if not panels:
        return
    with panel_grid(path, *grid_for(len(panels)), panel=(4.2, 3.4), used=len(panels)) as (_, axes):
        for ax, (task, solver) in zip(axes.flat, panels):
            for dsg, style in ((False, dict(color="tab:gray", marker="o", label="without")), (True, dict(color="tab:red", marker="s", label="with DiffStateGrad"))):
                pts = sorted((r["guidance_multiplier"], r[f"{metric}_mean"], r[f"{metric}_std"]) for r in rows
                             if r["task"] == task and r["solver"] == solver and r["diffstategrad"] == dsg)
                if pts:
                    xs, ys, es = zip(*pts)
                    ax.errorbar(xs, ys, yerr=es, capsize=3, **style)
            classical = (r for r in rows if r["task"] == task and not _needs_prior(r["solver"]) and math.isfinite(r[f"{metric}_mean"]))
            for k, r in enumerate(classical):  # (not finite: e.g. LPIPS with --lpips none, which a log axis cannot take)
                ax.axhline(r[f"{metric}_mean"], color=f"C{k + 2}", ls="--", lw=1, label=r["solver"])
            scales = [r["guidance_multiplier"] for r in rows if r["task"] == task and r["solver"] == solver]
            ax.set_xscale("log")  # limits set from the grid: a panel whose points are all NaN (failed) still draws
            ax.set_xlim(min(scales) / 1.5, max(scales) * 1.5)
            ax.set_title(f"{task} / {solver}", fontsize=10)
            ax.set_xlabel("guidance scale (x default)")
            ax.set_ylabel(metric.upper())
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
