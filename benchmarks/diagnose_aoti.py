"""Where does an AOTInductor package fail to load or run? Every build and every load runs in its own process.

On torch 2.11.0+cu130 / an H200, `torch._inductor.aoti_load_package` killed the process (SIGSEGV)
for CUDA packages of our stages. This script narrows that down in one command: it builds a
package per case (a plain Linear + GELU, then our stages with and without the fused-attention
op), loads each with each loader setting in a fresh process with faulthandler on, runs it, and
compares with eager; a load that dies is re-run under gdb (when installed) for the native
backtrace. The JSON report holds the environment (torch, CUDA, triton, GPU, driver, compiler)
and, per case and loader, the exit code, the error's tail and the backtrace.

    python benchmarks/diagnose_aoti.py --device cuda --out aoti_diagnosis.json
    python benchmarks/diagnose_aoti.py --device cpu --cases linear        # a quick self-check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
CASES = ("linear", "refinement", "decoder-torch", "decoder-op")
LOADERS = {"default": {}, "device-index-0": {"device_index": 0}, "single-threaded": {"run_single_threaded": True}}
TOL = 1e-3


# ------------------------------------------------------------------------------------ child steps


def _case(name: str, device):
    """(module, example inputs) of a case, on `device`."""
    import torch

    if name == "linear":
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).to(device).eval()
        return module, (torch.randn(4, 64, device=device),)
    from fssam_deploy.model import FSSAMConfig, build_stages, random_weights
    from fssam_deploy.stages import STAGE_SPECS, stage_module

    cfg = FSSAMConfig.from_name("tiny")
    stage, backend = {"refinement": ("refinement", "torch"), "decoder-torch": ("decoder", "torch"),
                      "decoder-op": ("decoder", "op")}[name]
    if backend == "op":
        from fssam_deploy.kernels import op  # noqa: F401  (registers torch.ops.fssam.calibrated_attention)
    module = stage_module(build_stages(random_weights(cfg, 0).to(device), attention_backend=backend), stage)
    feed = STAGE_SPECS[stage].dummy_inputs(cfg, batch=1, shots=cfg.shots)
    return module.to(device).eval(), tuple(t.to(device) for t in feed.values())


def child_build(case: str, device: str, package: str, reference: str) -> None:
    import torch

    module, example = _case(case, torch.device(device))
    with torch.no_grad():
        program = torch.export.export(module, example, strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=package)
        out = module(*example)
    out = out if isinstance(out, tuple) else (out,)
    torch.save({"inputs": [t.cpu() for t in example], "outputs": [t.cpu() for t in out]}, reference)


def child_load(case: str, device: str, package: str, reference: str, loader: str) -> None:
    import faulthandler

    faulthandler.enable()
    import torch

    if case == "decoder-op":
        from fssam_deploy.kernels import op  # noqa: F401  (the package may call the op through the proxy executor)
    ref = torch.load(reference)
    print("loading", package, LOADERS[loader], flush=True)
    model = torch._inductor.aoti_load_package(package, **LOADERS[loader])
    print("loaded; running", flush=True)
    got = model(*[t.to(device) for t in ref["inputs"]])
    got = got if isinstance(got, (tuple, list)) else (got,)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    err = max((g.float().cpu() - r.float()).abs().max().item() for g, r in zip(got, ref["outputs"]))
    print(json.dumps({"max_abs_err": err}), flush=True)
    if not err <= TOL:
        raise SystemExit(f"{package}: output differs from eager by {err:.3g} (> {TOL})")


# ------------------------------------------------------------------------------------ parent


def _run(argv: list[str], timeout: int) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = "timeout", exc.stdout or "", exc.stderr or ""
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err))
    result = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "stdout_tail": out[-1500:],
              "stderr_tail": err[-3000:]}
    if isinstance(rc, int) and rc < 0:
        result["signal"] = signal.Signals(-rc).name
    return result


def _gdb_backtrace(argv: list[str], timeout: int) -> str | None:
    gdb = shutil.which("gdb")
    if gdb is None:
        return None
    cmd = [gdb, "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40", "--args", *argv]
    r = _run(cmd, timeout)
    return (r["stdout_tail"] + r["stderr_tail"])[-4000:]


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "platform": platform.platform()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    smi = shutil.which("nvidia-smi")
    if smi:
        env["driver"] = _run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], 60)["stdout_tail"].strip()
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx:
        env["compiler"] = _run([cxx, "--version"], 60)["stdout_tail"].splitlines()[:1]
    return env


def diagnose(device: str, cases: list[str], loaders: list[str], work: Path, timeout: int) -> dict:
    report = {"environment": environment(device), "cases": {}}
    me = [sys.executable, str(HERE)]
    for case in cases:
        package, reference = str(work / f"{case}.pt2"), str(work / f"{case}.ref.pt")
        entry = {"build": _run([*me, "--child", "build", "--case", case, "--device", device, "--package", package,
                                "--reference", reference], timeout)}
        print(f"{case}: build rc={entry['build']['rc']} ({entry['build']['seconds']} s)", flush=True)
        if entry["build"]["rc"] == 0:
            for loader in loaders:
                argv = [*me, "--child", "load", "--case", case, "--device", device, "--package", package,
                        "--reference", reference, "--loader", loader]
                result = _run(argv, timeout)
                if isinstance(result["rc"], int) and result["rc"] < 0:
                    result["gdb_backtrace"] = _gdb_backtrace(argv, timeout)
                entry[f"load:{loader}"] = result
                print(f"{case}: load {loader} rc={result['rc']} {result.get('signal', '')}", flush=True)
        report["cases"][case] = entry
    report["summary"] = {case: {step: r["rc"] for step, r in e.items()} for case, e in report["cases"].items()}
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--loaders", default=",".join(LOADERS), help=f"comma list of {', '.join(LOADERS)}")
    ap.add_argument("--out", default="aoti_diagnosis.json")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per child process")
    ap.add_argument("--child", choices=["build", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--package", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--loader", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "build":
        child_build(args.case, args.device, args.package, args.reference)
        return 0
    if args.child == "load":
        child_load(args.case, args.device, args.package, args.reference, args.loader)
        return 0
    cases, loaders = args.cases.split(","), args.loaders.split(",")
    bad = sorted(set(cases) - set(CASES)) + sorted(set(loaders) - set(LOADERS))
    if bad:
        ap.error(f"unknown cases / loaders {bad}; cases: {list(CASES)}, loaders: {list(LOADERS)}")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="aoti_diag_") as work:
        report = diagnose(args.device, cases, loaders, Path(work), args.timeout)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out}")
    ok = all(rc == 0 for e in report["summary"].values() for rc in e.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
