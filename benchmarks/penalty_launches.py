"""Kernel launches of one SPR penalty step, per evaluation path and model size.

For ResNet-20/56/110 (3x32x32) and the structure kinds ``filter`` and ``filter+stream`` (cost:
parameters), the operators one penalty step issues, counted by ``torch.profiler``
(:func:`benchmarks.measure.launch_count`: ``aten`` operators that compute, outermost only; on a
CPU the launches the same code makes on a GPU; on CUDA also the CUDA kernels themselves):

    flat           SPRRegularizer.add_grad_() with path="flat" (nn.flat_penalty; the GPU default)
    per_family     add_grad_() with path="per-family" (the CPU default)
    in_loss        loss + reg() backward on the per-family path: how training ran before
                   add_grad_ (autograd adds the penalty's gradient one parameter at a time)

Counts are deterministic: no timing, no quiet machine needed (a few seconds).

    python -m benchmarks.penalty_launches
    python -m benchmarks.penalty_launches --device cuda
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import _common
from benchmarks.measure import launch_count, regularizer_step
from nn import CostConfig, SPRConfig, SPRRegularizer, build_model

MODELS = ("resnet20", "resnet56", "resnet110")
KINDS = {"filter": ("filter",), "filter+stream": ("filter", "stream")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="result stem (default benchmarks/results/"
                   "penalty_launches_<device>)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device here")
    rows = []
    for kinds, model_name in ((k, m) for k in KINDS for m in MODELS):
        torch.manual_seed(0)
        model = build_model(model_name).to(device)
        reg = SPRRegularizer(model, SPRConfig(lam=0.1, kinds=KINDS[kinds],
                                              cost=CostConfig(macs=0, params=1)))
        model(torch.randn(2, 3, 32, 32, device=device)).sum().backward()  # grads exist
        row = {"kinds": kinds, "model": model_name, "groups": reg.flat.n_groups,
               "tensors": len(reg.flat.names)}
        for name, path, fn in (("flat", "flat", reg.add_grad_),
                               ("per_family", "per-family", reg.add_grad_),
                               ("in_loss", "per-family", regularizer_step(reg))):
            reg.path = path
            c = launch_count(fn)
            row[f"{name}_ops"] = c["cpu_ops"]
            row[f"{name}_cuda_kernels"] = c["cuda_kernels"]
        rows.append(row)
    info = _common.machine_info(device.type)
    stem = _common.results_path(args.out, f"penalty_launches_{device.type}")
    _common.write_json(stem.with_suffix(".json"), {"benchmark": "penalty_launches",
                                                   "config": vars(args), "machine": info,
                                                   "rows": rows})
    _common.write_csv(stem.with_suffix(".csv"), rows)
    print(_common.format_machine(info))
    cols = [("kinds", "kinds", ""), ("model", "model", ""), ("groups", "groups", "d"),
            ("tensors", "tensors", "d"), ("flat_ops", "flat", ".0f"),
            ("per_family_ops", "per-family", ".0f"), ("in_loss_ops", "in loss (before)", ".0f")]
    if device.type == "cuda":
        cols += [("flat_cuda_kernels", "flat CUDA kernels", ".0f"),
                 ("in_loss_cuda_kernels", "in loss CUDA kernels", ".0f")]
    print(_common.table(rows, cols))
    print(f"wrote {stem}.json and {stem}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
