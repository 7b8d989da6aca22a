"""Helpers shared by the benchmark scripts: machine/code provenance and atomic result files.

Benchmarks only parse arguments, call the library (``nn``; measuring helpers in
:mod:`benchmarks.measure`) and write what they measured with the configuration, the machine and
the code version (:func:`nn.provenance.git_info`) attached (DESIGN §8.13).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
from pathlib import Path

from nn.io import atomic_write
from nn.provenance import git_info

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def wait_for_load(below: float, timeout_s: float = 900, poll_s: float = 15) -> float:
    """Sleep until the 1-minute load average is below ``below`` (other jobs on a shared
    machine distort timings badly: with 2 OpenMP threads on 2 busy cores, small operators
    wait on each other); gives up after ``timeout_s``.  Returns the seconds waited."""
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        load = load_average()
        if load is None or load[0] < below:
            break
        time.sleep(poll_s)
    return time.monotonic() - t0


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value; ``(None, None)`` for none)."""
    import statistics

    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def machine_info(device: str = "cpu") -> dict:
    """Platform, CPU, cores, library versions, torch threads, git commit, time, load."""
    import numpy
    import torch

    from nn.latency import device_name

    info = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": device_name("cpu"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_1_5_15": load_average(),
        "git": git_info(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def format_machine(info: dict) -> str:
    g = info.get("git") or {}
    lines = [
        f"machine : {info['cpu_model']} | {info['cpu_count']} cores | {info['platform']}",
        f"software: python {info['python']}, torch {info['torch']} "
        f"({info['cpu_capability']}, mkldnn={info['mkldnn']}), numpy {info['numpy']}, "
        f"torch threads {info['torch_threads']}",
        f"code    : commit {g.get('commit')} dirty={g.get('dirty')}",
        f"time    : {info['timestamp']}  load average (1/5/15 min) {info['load_average_1_5_15']}",
    ]
    if "gpu" in info:
        lines.append(f"gpu     : {info['gpu']} (CUDA {info['cuda']}, cuDNN {info['cudnn']})")
    return "\n".join(lines)


def _write_bytes(path, data: bytes) -> Path:
    """``data`` to ``path`` atomically (:func:`nn.io.atomic_write`), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(data))
    return path


def write_json(path, obj) -> Path:
    return _write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False,
                                          default=str) + "\n").encode())


def write_csv(path, rows: list[dict]) -> Path:
    """Rows of flat dicts; the header is the union of keys in first-seen order."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return _write_bytes(path, buf.getvalue().encode())


def write_png(path, fig) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return _write_bytes(path, buf.getvalue())


def results_path(out: str | None, default_stem: str) -> Path:
    """``--out`` as a stem (``.json``/``.csv``/``.png`` are appended); default under results/."""
    if out is None:
        return RESULTS / default_stem
    p = Path(out)
    return p.with_suffix("") if p.suffix in (".json", ".csv", ".png") else p


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Plain-text table: ``cols`` = (key, header, format spec)."""
    head = [h for _, h, _ in cols]
    body = [[("" if r.get(k) is None else format(r[k], f) if f else str(r[k]))
             for k, _, f in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*b) for b in body])
