"""The service against the in-process runtime: latency vs concurrency with Triton's own statistics, and a soak.

    python benchmarks/bench_serve.py --preset tiny --backend torch --out benchmarks/results/serve_tiny_cpu

1. In process: `SupportSession.segment` latency at batch 1, and the best batched throughput (batch 1..8).
2. Through the server (PyTriton on loopback, dynamic batching): cached-support queries (raw uint8 at the model
   size, so the work equals the in-process call) from 1/2/4/8 concurrent clients; p50/p90/p99 per level, with
   Triton's `/v2/models/fssam_segment_cached/stats` deltas beside (queue, compute input / infer / output per
   request, requests per execution).
3. Soak: `--soak` requests from 8 clients, `--malformed` of them malformed (the kinds of issue 13 item 4),
   cached and uncached, a server restart in the middle on the same registry folder: server crashes, wrong masks
   on good requests (against in-process results), every registered id served after the restart.
Bounded: `--requests` per level and `--time-limit` seconds per phase. Writes serve.json, serve.md, serve.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fssam_deploy.client import FSSAMClient
from fssam_deploy.errors import FSSAMError
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.serve.codec import Limits
from fssam_deploy.serve.server import FSSAMServer, ServeSettings
from fssam_deploy.synthetic import synthetic_episode

MODEL = "fssam_segment_cached"


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else float("nan")


def in_process(episode, cfg, iters: int):
    """ms per cached query at batch 1, and the best queries/s over batches 1, 2, 4, 8."""
    s = cfg.image_size
    q, _, sup, masks = synthetic_episode(s, 1, seed=0)
    from fssam_deploy.serve.codec import queries_to_tensor, supports_to_tensors

    session = episode.with_supports(*supports_to_tensors(sup, masks, s))
    x1 = queries_to_tensor([q], s)
    best = {}
    with torch.inference_mode():
        session.segment(x1)
        t = []
        for _ in range(iters):
            t0 = time.perf_counter()
            session.segment(x1)
            t.append(time.perf_counter() - t0)
        for b in (1, 2, 4, 8):
            xb = x1.expand(b, -1, -1, -1).contiguous()
            session.segment(xb)
            t0 = time.perf_counter()
            n = max(1, iters // b)
            for _ in range(n):
                session.segment(xb)
            best[b] = n * b / (time.perf_counter() - t0)
    return statistics.median(t) * 1e3, best


def stats_snapshot(client) -> dict:
    st = client.stats(MODEL)["model_stats"][0]
    inf = st["inference_stats"]
    get = lambda k: (int(inf[k]["count"]), int(inf[k]["ns"]))  # noqa: E731
    return {k: get(k) for k in ("success", "queue", "compute_input", "compute_infer", "compute_output")} | {
        "executions": int(st.get("execution_count", 0))}


def stats_delta(a: dict, b: dict) -> dict:
    n = max(1, b["success"][0] - a["success"][0])
    out = {k: (b[k][1] - a[k][1]) / n / 1e6 for k in ("queue", "compute_input", "compute_infer", "compute_output")}
    out["requests_per_execution"] = n / max(1, b["executions"] - a["executions"])
    return out


def load_level(url: str, sid: str, query: np.ndarray, conc: int, count: int, limit_s: float):
    lat, lock, deadline = [], threading.Lock(), time.monotonic() + limit_s
    per = max(1, count // conc)

    def work():
        with FSSAMClient(url, timeout_s=300) as c:
            for _ in range(per):
                if time.monotonic() > deadline:
                    return
                t0 = time.perf_counter()
                c.segment(query, support_id=sid)
                with lock:
                    lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=work) for _ in range(conc)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, len(lat) / (time.perf_counter() - t0)


def malformed(i: int, c: FSSAMClient, sid: str, q: np.ndarray):
    kinds = [lambda: c.infer(MODEL, [c._input("query", np.array([[b"not a png"]], dtype=object)),
                                     c._input("support_id", np.array([[sid.encode()]], dtype=object))], ["mask"]),
             lambda: c.infer(MODEL, [c._input("query_raw", q[None, ..., 0]),
                                     c._input("support_id", np.array([[sid.encode()]], dtype=object))], ["mask"]),
             lambda: c.segment(q, support_id="0" * 64),
             lambda: c.segment(q, supports=[q, q], masks=[q[..., 0]]),
             lambda: c.segment(np.zeros((3000, 3000, 3), np.uint8), support_id=sid)]
    kinds[i % len(kinds)]()


def soak(server_box, cfg, sets, ids, refs, total: int, bad_frac: float, limit_s: float):
    """8 clients, `total` requests, `bad_frac` malformed; a restart at half way. -> counts."""
    counts = {"good": 0, "good_ok": 0, "wrong_masks": 0, "bad": 0, "bad_refused": 0, "bad_accepted": 0,
              "unavailable_retries": 0, "other_errors": []}
    lock, deadline = threading.Lock(), time.monotonic() + limit_s
    next_i = [0]
    restarted = threading.Event()

    def take():
        with lock:
            i = next_i[0]
            next_i[0] += 1
            return i if i < total else None

    def work():
        with FSSAMClient(server_box["url"], timeout_s=300) as c:
            while (i := take()) is not None and time.monotonic() < deadline:
                e = i % len(sets)
                q = sets[e][0]
                if (i * 7919) % 100 < bad_frac * 100:
                    with lock:
                        counts["bad"] += 1
                    try:
                        malformed(i, c, ids[e], q)
                        with lock:
                            counts["bad_accepted"] += 1
                    except FSSAMError:
                        with lock:
                            counts["bad_refused"] += 1
                    continue
                for _attempt in range(120):
                    try:
                        mask, _ = (c.segment(q, support_id=ids[e]) if i % 3 else
                                   c.segment(q, supports=sets[e][1], masks=sets[e][2]))
                        break
                    except FSSAMError as exc:
                        if "cannot reach" not in str(exc) and "unavailable" not in str(exc).lower():
                            with lock:
                                counts["other_errors"].append({"request": i, "after_restart": restarted.is_set(),
                                                               "error": str(exc)[-2000:]})
                            mask = None
                            break
                        with lock:
                            counts["unavailable_retries"] += 1
                        time.sleep(0.5)
                with lock:
                    counts["good"] += 1
                    if mask is not None and np.array_equal(mask, refs[e]):
                        counts["good_ok"] += 1
                    elif mask is not None:
                        counts["wrong_masks"] += 1
                if i >= total // 2 and not restarted.is_set():
                    with lock:
                        if not restarted.is_set():
                            restarted.set()
                            server_box["restart"]()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts["restarted"] = restarted.is_set()
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--engine-dir")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    ap.add_argument("--iters", type=int, default=10, help="in-process iterations")
    ap.add_argument("--soak", type=int, default=500)
    ap.add_argument("--malformed", type=float, default=0.1)
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per phase")
    ap.add_argument("--out", default="benchmarks/results/serve")
    args = ap.parse_args(argv)
    from fssam_deploy.backends.registry import open_backend

    cfg = FSSAMConfig.from_name(args.preset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        episode = open_backend(args.backend, cfg, engine_dir=args.engine_dir, seed=0)
    inproc_ms, best = in_process(episode, cfg, args.iters)
    print(f"in-process: {inproc_ms:.1f} ms / cached query; best batched {max(best.values()):.2f} q/s {best}")
    s = cfg.image_size
    sets = [synthetic_episode(s, 1, seed=e) for e in range(3)]
    sets = [(q, sup, [m.astype(np.uint8) for m in masks]) for q, _, sup, masks in sets]
    registry = tempfile.TemporaryDirectory(prefix="fssam-bench-serve-")
    st = ServeSettings(backend=args.backend, engine_dir=args.engine_dir, http_port=0, grpc_port=0, metrics_port=0,
                       registry=registry.name, max_batch=8, instances=2,
                       limits=Limits(max_request_bytes=8 << 20))
    box = {"server": FSSAMServer(st, cfg, episode=episode).start()}
    box["url"] = box["server"].http_url
    rows = []
    try:
        with FSSAMClient(box["url"], timeout_s=300) as c:
            ids = [c.register(sup, masks) for _, sup, masks in sets]
            refs = [c.segment(q, supports=sup, masks=masks)[0] for q, sup, masks in sets]
            from fssam_deploy.serve.codec import queries_to_tensor, supports_to_tensors, to_original

            for (q, sup, masks), ref in zip(sets, refs):  # the server's masks = the in-process ones
                with torch.inference_mode():
                    lg = episode.with_supports(*supports_to_tensors(sup, masks, s)).segment(queries_to_tensor([q], s))
                assert np.array_equal(to_original(lg[0], q.shape[:2])[0].astype(bool), ref)
            for conc in [int(x) for x in args.concurrency.split(",")]:
                load_level(box["url"], ids[0], sets[0][0], conc, conc, args.time_limit)  # warm-up
                a = stats_snapshot(c)
                lat, qps = load_level(box["url"], ids[0], sets[0][0], conc, args.requests, args.time_limit)
                d = stats_delta(a, stats_snapshot(c))
                rows.append({"concurrency": conc, "n": len(lat), "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90),
                             "p99_ms": pct(lat, 99), "qps": qps, **{f"triton_{k}": v for k, v in d.items()}})
                print(rows[-1])

        def restart():
            box["server"].stop()
            st2 = ServeSettings(**{**st.__dict__})
            box["server"] = FSSAMServer(st2, cfg, episode=episode).start()

        box["restart"] = restart
        soak_counts = soak(box, cfg, sets, ids, refs, args.soak, args.malformed, args.time_limit)
        with FSSAMClient(box["url"], timeout_s=300) as c:
            soak_counts["ids_served_after_restart"] = sum(
                np.array_equal(c.segment(q, support_id=i)[0], r) for (q, _, _), i, r in zip(sets, ids, refs))
        soak_counts["ids_registered"] = len(ids)
        soak_counts["server_alive"] = box["server"].is_alive()
    finally:
        box["server"].stop()
        episode.close()
        registry.cleanup()
    from fssam_deploy.hostinfo import host_summary

    result = {"preset": args.preset, "backend": args.backend, "host": host_summary(torch.get_num_threads()),
              "torch": torch.__version__, "in_process_ms": inproc_ms, "in_process_best_qps": best, "levels": rows,
              "soak": soak_counts,
              "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write(result, Path(args.out))
    return 0


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2, default=str))
    best = max(result["in_process_best_qps"].values())
    lines = [f"{result['preset']} config, {result['backend']} backend, {result['host']}", "",
             f"in-process cached query: {result['in_process_ms']:.1f} ms; best batched {best:.2f} queries/s", "",
             "| clients | n | p50 ms | p90 ms | p99 ms | q/s | vs in-process latency | vs best q/s | Triton queue ms | "
             "compute input ms | compute infer ms | compute output ms | requests / execution |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["levels"]:
        lines.append(f"| {r['concurrency']} | {r['n']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['qps']:.2f} | {r['p50_ms'] / result['in_process_ms']:.2f}x | {r['qps'] / best:.2f}x | "
                     f"{r['triton_queue']:.1f} | {r['triton_compute_input']:.2f} | {r['triton_compute_infer']:.1f} | "
                     f"{r['triton_compute_output']:.2f} | {r['triton_requests_per_execution']:.2f} |")
    s = result["soak"]
    lines += ["", f"soak: {s['good']} good ({s['good_ok']} right masks, {s['wrong_masks']} wrong, "
              f"{len(s['other_errors'])} errors), {s['bad']} malformed ({s['bad_refused']} refused, "
              f"{s['bad_accepted']} accepted), restart {'done' if s['restarted'] else 'NOT done'} "
              f"({s['unavailable_retries']} retries while it restarted), ids served after restart "
              f"{s['ids_served_after_restart']}/{s['ids_registered']}, server alive {s['server_alive']}"]
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        c = [r["concurrency"] for r in result["levels"]]
        for q in ("p50", "p90", "p99"):
            ax.plot(c, [r[f"{q}_ms"] for r in result["levels"]], marker="o", label=q)
        ax.axhline(result["in_process_ms"], color="gray", ls="--", label="in-process")
        ax.set(xlabel="concurrent clients", ylabel="latency ms", title=f"fssam_segment_cached ({result['preset']})")
        ax.legend()
        fig.savefig(out / "serve.png", dpi=120, bbox_inches="tight")
    except ImportError:
        print("matplotlib is not installed: no serve.png (pip install 'fssam-deploy[bench]')")


if __name__ == "__main__":
    raise SystemExit(main())
