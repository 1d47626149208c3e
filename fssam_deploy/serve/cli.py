"""`fssam serve` and `fssam client`: parsers and commands, for `fssam_deploy.cli` to add.

`add_serve_parsers(subparsers, add_model_flags)` adds both subcommands; `cmd_serve(args, config_from_args)`
and `cmd_client(args)` run them (each one call into `serve.server` / `fssam_deploy.client`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fssam_deploy.auto import add_accuracy_flag, resolve_auto_backend
from fssam_deploy.errors import InputError


def add_serve_parsers(subparsers, add_model_flags, config_from_args=None) -> None:
    """Add `serve` and `client` to an argparse subparsers object; `add_model_flags(parser)` adds the model flags.

    With `config_from_args(args, shots) -> FSSAMConfig` (the CLI's), each subcommand's `func` default is set
    (`args.func(args)` runs it)."""
    p = subparsers.add_parser("serve", help="serve FSSAM on Triton (PyTriton): segment, register, segment_cached",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(p)
    p.add_argument("--backend", default="torch", help="a registry backend (torch, onnxruntime, openvino, aoti, ...), "
                   "or auto: the fastest `fssam tune` measured here that meets --accuracy and reads --engine-dir")
    add_accuracy_flag(p, "--backend")
    p.add_argument("--engine-dir", help="the backend's artifacts (graphs, packages, engines); not for torch")
    p.add_argument("--shots", type=int, default=1, help="shots the engine was built for (torch takes any)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP port (0: a free one)")
    p.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC port (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (0: a free one)")
    p.add_argument("--instances", type=int, default=1, help="model instances (callables) per model")
    p.add_argument("--max-batch", type=int, default=8, help="dynamic batching: most requests per batched call")
    p.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batching: wait for more requests")
    p.add_argument("--registry", help="folder of registered support sets (kept across restarts and replicas)")
    p.add_argument("--memory-mb", type=int, default=1024, help="registry memory budget (LRU), MiB")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="refuse requests with more input data")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="refuse larger images")
    p.add_argument("--max-supports", type=int, default=16, help="refuse more supports per request")
    p.add_argument("--exit-timeout", type=int, default=25, help="seconds the requests in flight and queued get to "
                   "finish on SIGTERM (at most 25: PyTriton kills tritonserver 30 s after asking it to stop); "
                   "requests still queued then get an error response")
    p.add_argument("--verbose", action="store_true", help="print Triton's log")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="listen at once, without first "
                   "running one synthetic episode (a compiled backend then compiles on the first request)")
    if config_from_args is not None:
        p.set_defaults(func=lambda args: cmd_serve(args, config_from_args))

    c = subparsers.add_parser("client", help="talk to `fssam serve`: register a support set, segment queries")
    c.add_argument("--url", default="127.0.0.1:8000", help="host:port of the server's HTTP (or gRPC) endpoint")
    c.add_argument("--protocol", default="http", choices=("http", "grpc"))
    c.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    c.set_defaults(func=cmd_client)
    sub = c.add_subparsers(dest="client_cmd", required=True)
    r = sub.add_parser("register", help="encode a support set on the server; prints its support id last")
    r.add_argument("--support", action="append", required=True, help="support image (repeat for K shots)")
    r.add_argument("--support-mask", action="append", required=True, help="its mask (repeat, same order)")
    s = sub.add_parser("segment", help="segment queries; writes what `fssam run` writes")
    s.add_argument("--support-id", help="a registered support set (from `fssam client register`)")
    s.add_argument("--support", action="append", help="support image, instead of --support-id (repeat)")
    s.add_argument("--support-mask", action="append", help="its mask (repeat, same order)")
    s.add_argument("--query", action="append", required=True, help="query image or folder (repeat)")
    s.add_argument("--out", required=True, help="mask PNG (a folder for several queries)")
    s.add_argument("--logits", help="logits .npy at the query's size (a folder for several queries)")


def check_serve_flags(args) -> None:
    """Every number `fssam serve` takes, checked before anything is loaded (one `error:` line naming the flag)."""
    from fssam_deploy.errors import ConfigError
    from fssam_deploy.preflight import check_positive
    from fssam_deploy.serve.server import MAX_EXIT_TIMEOUT_S

    for flag, value, minimum in (("--instances", args.instances, 1), ("--max-batch", args.max_batch, 1),
                                 ("--queue-delay-us", args.queue_delay_us, 0), ("--memory-mb", args.memory_mb, 1),
                                 ("--max-pixels", args.max_pixels, 1), ("--max-supports", args.max_supports, 1),
                                 ("--exit-timeout", args.exit_timeout, 1)):
        check_positive(flag, value, minimum)
    if args.exit_timeout > MAX_EXIT_TIMEOUT_S:
        raise ConfigError(f"--exit-timeout {args.exit_timeout}: at most {MAX_EXIT_TIMEOUT_S} (PyTriton kills "
                          "tritonserver 30 s after asking it to stop, cutting off what is still in flight)")
    for flag in ("--http-port", "--grpc-port", "--metrics-port"):
        port = getattr(args, flag[2:].replace("-", "_"))
        if not 0 <= port <= 65535:
            raise ConfigError(f"{flag} {port}: give a port in 1..65535, or 0 for a free one")
    if not args.max_request_mb > 0:
        raise ConfigError(f"--max-request-mb {args.max_request_mb}: must be > 0")


def _settings(args):
    from fssam_deploy.serve.codec import Limits
    from fssam_deploy.serve.server import ServeSettings

    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_pixels=args.max_pixels,
                    max_supports=args.max_supports)
    return ServeSettings(backend=args.backend, engine_dir=args.engine_dir, checkpoint=args.checkpoint,
                         sam2_checkpoint=args.sam2_checkpoint, dino_checkpoint=args.dino_checkpoint, seed=args.seed,
                         device=args.device, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                         metrics_port=args.metrics_port, instances=args.instances, max_batch=args.max_batch,
                         queue_delay_us=args.queue_delay_us, registry=args.registry, memory_mb=args.memory_mb,
                         limits=limits, exit_timeout_s=args.exit_timeout, verbose=args.verbose,
                         warmup=args.warmup)


def cmd_serve(args, config_from_args) -> int:
    """Run the server until SIGTERM / Ctrl-C. `config_from_args(args, shots)` -> FSSAMConfig (the CLI's)."""
    import sys

    from fssam_deploy.backends.registry import get
    from fssam_deploy.serve.server import serve

    check_serve_flags(args)
    cfg = config_from_args(args, shots=args.shots)
    resolve_auto_backend(args, cfg)
    if not (args.checkpoint or args.sam2_checkpoint or args.dino_checkpoint):
        print(f"WARNING: no checkpoint given: RANDOM weights (seed {args.seed}). The masks mean nothing.",
              file=sys.stderr)

    if args.warmup:
        print(f"fssam serve: loading {args.backend} and running one synthetic episode before listening"
              + (f" (it compiles every stage{': minutes on a CPU' if args.device == 'cpu' else ''})"
                 if get(args.backend).jit else ""), flush=True)

    def ready(server):
        warm = f" (warm-up episode {server.warmup_s:.1f} s)" if server.warmup_s is not None else ""
        print(f"fssam serve: {args.backend} ({cfg.sam2_config}, {cfg.dino}, {cfg.image_size} px) ready{warm}: "
              f"http {server.http_url}, grpc {server.grpc_url}, metrics {server.metrics_url}; registry "
              f"{args.registry or '(memory only)'}; SIGTERM or Ctrl-C stops", flush=True)

    return serve(_settings(args), cfg, ready=ready)


def cmd_client(args) -> int:
    """`fssam client register|segment`."""
    import numpy as np

    from fssam_deploy.client import FSSAMClient
    from fssam_deploy.imageio import list_images, write_logits, write_mask

    with FSSAMClient(args.url, args.protocol, args.timeout) as client:
        if args.client_cmd == "register":
            if len(args.support) != len(args.support_mask):
                raise InputError(f"{len(args.support)} --support but {len(args.support_mask)} --support-mask: give "
                                 "one mask per support, in the same order")
            print(client.register(args.support, args.support_mask))
            return 0
        if bool(args.support_id) == bool(args.support):
            raise InputError("fssam client segment: give --support-id, or --support/--support-mask (not both)")
        if args.support and len(args.support) != len(args.support_mask or []):
            raise InputError(f"{len(args.support)} --support but {len(args.support_mask or [])} --support-mask")
        queries = list_images(args.query)
        many = len(queries) > 1
        if many and Path(args.out).suffix:
            raise InputError(f"--out {args.out}: with {len(queries)} queries, --out must be a folder")
        for q in queries:
            mask, logits = client.segment(q, support_id=args.support_id, supports=args.support,
                                          masks=args.support_mask)
            out = Path(args.out) / f"{q.stem}.png" if many else Path(args.out)
            write_mask(out, mask)
            if args.logits:
                write_logits(Path(args.logits) / f"{q.stem}.npy" if many else Path(args.logits), logits)
            print(f"{q}: mask {out} ({np.mean(mask) * 100:.1f}% foreground)")
    return 0
