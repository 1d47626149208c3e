"""One graph against PyTorch with Polygraphy: its ONNX Runtime runner on the stage's inputs, the PyTorch
outputs as the reference run, `Comparator.compare_accuracy` for the per-output errors and verdicts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fssam_deploy.errors import InputError

REFERENCE = "torch"
RUNNER = "onnxruntime"


@dataclass
class OutputErrors:
    """Worst case over the iterations (batch slices) of one output."""

    max_abs: float  # Polygraphy max_absdiff
    max_rel: float  # Polygraphy max_reldiff: elementwise |a - b| / |b|, large where b is near 0
    passed: bool  # Polygraphy's verdict for atol (check_error_stat="max", rtol=0)
    off: float | None = None  # the share of elements off by more than `share_atol`, where one was asked for


def graph_inputs(path: str | Path) -> tuple[list[str], int | None]:
    """The graph's input names and its fixed batch (first axis of its first input; None when dynamic)."""
    import onnx

    inputs = onnx.load(str(path), load_external_data=False).graph.input
    first = inputs[0].type.tensor_type.shape.dim[0]
    return [i.name for i in inputs], first.dim_value if first.HasField("dim_value") else None


def split(arrays: dict[str, np.ndarray], step: int | None) -> list[dict[str, np.ndarray]]:
    """One dict per `step`-sized slice of the batch axis (the whole batch when `step` is None)."""
    batch = next(iter(arrays.values())).shape[0]
    step = step or batch
    return [{k: np.ascontiguousarray(v[i : i + step]) for k, v in arrays.items()} for i in range(0, batch, step)]


def compare_graph(path: str | Path, feed: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                  atol: dict[str, float], providers: list[str] | None = None,
                  model: bytes | str | None = None,
                  share_atol: dict[str, float] | None = None) -> tuple[dict[str, OutputErrors], float]:
    """Run the graph at `path` on `feed` with Polygraphy's OnnxrtRunner (after one warm-up run), compare with
    `reference` (PyTorch's outputs on the same feed) by Comparator.compare_accuracy with max |error| <= atol
    per output; -> ({output: errors}, onnxruntime seconds summed over the iterations).

    A feed whose batch exceeds the graph's static batch runs as several iterations of that batch.
    `model`: what ONNX Runtime loads instead of `path` (a serialized rewrite of it, e.g. a bf16 emulation).
    `share_atol`: {output: atol} for outputs whose share of elements off by more than atol is wanted
    (`parity.share_off` over every iteration: the bf16-rounded memory's rule).
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    from fssam_deploy.parity import share_off

    names, step = graph_inputs(path)  # the exporter drops inputs a graph does not use
    missing = sorted(set(names) - set(feed))
    if missing:
        raise InputError(f"{path}: graph inputs {missing} are not in the feed (it has {sorted(feed)})")
    feeds = split({k: feed[k] for k in names}, step)
    refs = split(reference, step)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # verdicts go to the report, not the log
        runner = OnnxrtRunner(SessionFromOnnx(model or str(path), providers=providers or ["cpu"]), name=RUNNER)
        results = RunResults()
        results.add(refs, runner_name=REFERENCE)
        for name, iterations in Comparator.run([runner], data_loader=feeds, warm_up=1).items():
            results.append((name, iterations))
        compare = SimpleCompareFunc(atol=atol, rtol=0.0, check_error_stat="max")
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)[0]
    per_iteration = accuracy[(REFERENCE, RUNNER)]
    errors = {}
    for out in reference:
        found = [it[out] for it in per_iteration]
        off = None
        if share_atol and out in share_atol:
            got = np.concatenate([it[out] for it in results[RUNNER]])
            off = share_off(got, reference[out], share_atol[out])
        errors[out] = OutputErrors(_worst(r.max_absdiff for r in found), _worst(r.max_reldiff for r in found),
                                   all(bool(r) for r in found), off)
    seconds = sum(it.runtime for it in results[RUNNER])
    return errors, seconds


def _worst(values) -> float:
    """max, where NaN (an inf or NaN output) wins."""
    values = [float(v) for v in values]
    return math.nan if any(math.isnan(v) for v in values) else max(values)
