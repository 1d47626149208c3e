"""`serve(...)`: FSSAM on PyTriton (the real `tritonserver` with its Python backend), HTTP / gRPC / metrics.

`FSSAMServer` opens the backend's episode (`backends.open_backend`), the support store and the three
models of `serve.models`, and starts Triton on `host` (127.0.0.1 by default) and the given ports;
`stop()` lets the requests in flight finish (Triton's exit timeout), flushes the registry and closes
the episode. `serve()` runs one until SIGTERM or SIGINT, then stops it the same way.

The Python backend's stub is a separate binary linked against `libpython`; with an interpreter built
outside the system (pyenv), it would load the system's older libpython and die at start
(`'_thread.RLock' object has no attribute '_recursion_count'`). The server process therefore gets the
running interpreter's own `sysconfig LIBDIR` first on its LD_LIBRARY_PATH (`server_env`).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fssam_deploy.errors import BackendUnavailableError, ConfigError, EngineError, FSSAMError
from fssam_deploy.serve.codec import Limits
from fssam_deploy.serve.models import FSSAMService, bind_models

START_ATTEMPTS = 3
# PyTriton's stop() sends tritonserver SIGINT, waits 30 s, then kills it: Triton's own exit timeout (the time it
# gives requests in flight and queued) must end before that, or those requests are cut off with the process.
MAX_EXIT_TIMEOUT_S = 25


@dataclass
class ServeSettings:
    """Everything `fssam serve` sets. Ports 0 mean: pick free ones on `host` at start."""

    backend: str = "torch"
    engine_dir: str | None = None
    checkpoint: str | None = None
    sam2_checkpoint: str | None = None
    dino_checkpoint: str | None = None
    seed: int = 0
    device: str = "cpu"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    max_batch: int = 8
    queue_delay_us: int = 2000
    registry: str | None = None
    memory_mb: int = 1024
    limits: Limits = field(default_factory=Limits)
    exit_timeout_s: int = MAX_EXIT_TIMEOUT_S
    verbose: bool = False
    warmup: bool = True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


PORTS = (("http_port", "--http-port"), ("grpc_port", "--grpc-port"), ("metrics_port", "--metrics-port"))


def check_ports_free(st: ServeSettings) -> None:
    """Each of the three ports can be listened on now, or a ConfigError naming its flag: checked before the
    episode is loaded and warmed up (minutes for a compiled backend), not found only when Triton binds.
    SO_REUSEADDR as a server sets it: a port with connections in TIME_WAIT is free, one with a listener is not."""
    for name, flag in PORTS:
        port = getattr(st, name)
        with socket.socket(socket.AF_INET6 if ":" in st.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((st.host, port))
                s.listen(1)
            except OSError as exc:
                raise ConfigError(f"{flag} {port}: cannot listen on {st.host}:{port} ({exc.strerror or exc}); "
                                  f"stop what holds it, or pick another port (0: a free one)") from None


def server_env_libdir() -> str | None:
    """The running interpreter's lib folder (holding its libpython), for the Python backend stub."""
    libdir = sysconfig.get_config_var("LIBDIR")
    return libdir if libdir and os.path.isdir(libdir) else None


class _EnvPrefix:
    """Put `path` first on LD_LIBRARY_PATH while the server process starts (PyTriton copies os.environ)."""

    def __init__(self, path: str | None):
        self.path, self.old = path, None

    def __enter__(self):
        self.old = os.environ.get("LD_LIBRARY_PATH")
        if self.path:
            os.environ["LD_LIBRARY_PATH"] = self.path + (f":{self.old}" if self.old else "")

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = self.old


def open_episode(st: ServeSettings, cfg):
    """The episode of `st.backend` (the registry's `open_backend`)."""
    from fssam_deploy.backends.registry import open_backend

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSSAM is running with RANDOM weights")
        return open_backend(st.backend, cfg, device=st.device, engine_dir=st.engine_dir, checkpoint=st.checkpoint,
                            sam2_checkpoint=st.sam2_checkpoint, dino_checkpoint=st.dino_checkpoint, seed=st.seed)


def _precision(backend: str) -> str:
    from fssam_deploy.backends.registry import get

    return get(backend).precision


class FSSAMServer:
    """One running service: `start()`, `urls`, `stop()`; also a context manager (stops on exit, failure too).

    `episode`: an already open episode to serve (tests, benchmarks); else the backend of `settings`."""

    def __init__(self, settings: ServeSettings, cfg, episode=None):
        self.st, self.cfg = settings, cfg
        self._episode = episode
        self._owns_episode = episode is None
        self.triton = None
        self.service: FSSAMService | None = None
        self.warmup_s: float | None = None  # seconds of `FSSAMService.warm_up`, None: not run
        self._stopped = threading.Event()
        self._released = threading.Event()  # set when stop() is done (ends the owner thread, see start())
        self._logdir = tempfile.TemporaryDirectory(prefix="fssam-serve-")  # Triton's log unless --verbose

    def log(self) -> str:
        """Triton's log so far (written to a temporary file unless `verbose`)."""
        p = Path(self._logdir.name) / "tritonserver.log"
        return p.read_text(errors="replace") if p.is_file() else ""

    @property
    def http_url(self) -> str:
        return f"{self.st.host}:{self.st.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.st.host}:{self.st.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.st.host}:{self.st.metrics_port}/metrics"

    def start(self) -> FSSAMServer:
        """Start and wait until it answers. From a thread other than the main one, the server is started from a
        thread of its own that lives until `stop()`: PyTriton starts tritonserver with PR_SET_PDEATHSIG, so
        tritonserver gets SIGTERM when the *thread* that started it ends (seen: a server restarted from a
        worker thread died when that worker finished)."""
        if threading.current_thread() is threading.main_thread():
            return self._start()
        box: dict = {}
        started = threading.Event()

        def own() -> None:
            try:
                self._start()
            except BaseException as exc:  # handed to the caller below
                box["exc"] = exc
            finally:
                started.set()
            if "exc" not in box:
                self._released.wait()  # until stop() has stopped tritonserver

        threading.Thread(target=own, name="fssam-serve-owner", daemon=True).start()
        started.wait()
        if "exc" in box:
            raise box["exc"]
        return self

    def _start(self) -> FSSAMServer:
        try:
            from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
        except ImportError as exc:
            raise BackendUnavailableError(f"fssam serve needs nvidia-pytriton ({exc}): pip install "
                                          "'fssam-deploy[serve]' (it needs numpy<2)") from None
        from fssam_deploy.manifest import weights_id

        st = self.st
        try:  # an error or a signal (see `serve`) while loading or warming up: nothing left open
            for name, _ in PORTS:
                if getattr(st, name) == 0:
                    setattr(st, name, free_port(st.host))
            if len({st.http_port, st.grpc_port, st.metrics_port}) != 3:
                raise ConfigError(f"--http-port {st.http_port}, --grpc-port {st.grpc_port}, --metrics-port "
                                  f"{st.metrics_port}: give three different ports")
            check_ports_free(st)
            if self._episode is None:
                self._episode = open_episode(st, self.cfg)
            self.service = FSSAMService(self._episode, weights_id(st.checkpoint, st.seed), _precision(st.backend),
                                        limits=st.limits, budget_bytes=st.memory_mb << 20, registry=st.registry)
            self.service.store.warm()
            if st.warmup:
                try:
                    self.warmup_s = self.service.warm_up()
                except (RuntimeError, FSSAMError) as exc:
                    raise EngineError(f"fssam serve: the warm-up episode failed on backend {st.backend!r} "
                                      f"({type(exc).__name__}: {str(exc)[:300]}); fix that, or start with "
                                      "--no-warmup to let the first request meet it") from None
        except BaseException:
            self.stop()
            raise
        config = TritonConfig(http_address=st.host, grpc_address=st.host, metrics_address=st.host,
                              http_port=st.http_port, grpc_port=st.grpc_port, metrics_port=st.metrics_port,
                              exit_timeout_secs=st.exit_timeout_s, log_verbose=1 if st.verbose else 0,
                              log_file=None if st.verbose else Path(self._logdir.name) / "tritonserver.log")
        # statistics stay readable (the benchmark reads /v2/models/<m>/stats); the rest keeps PyTriton's token
        security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace",
                                                              "logging"])
        for attempt in range(1, START_ATTEMPTS + 1):
            self.triton = Triton(config=config, security_config=security)
            try:
                bind_models(self.triton, self.service, st.instances, st.max_batch, st.queue_delay_us)
                with _EnvPrefix(server_env_libdir()):
                    self.triton.run()
                return self
            except Exception as exc:
                if attempt < START_ATTEMPTS and handshake_missed(exc):
                    print(f"fssam serve: a model instance missed PyTriton's start-up handshake (a loaded CPU); "
                          f"starting Triton again (attempt {attempt + 1} of {START_ATTEMPTS})", file=sys.stderr,
                          flush=True)
                    self.triton.stop()
                    continue
                self.stop()
                raise
            except BaseException:
                self.stop()
                raise
        return self

    def is_alive(self) -> bool:
        return self.triton is not None and self.triton.is_alive()

    def stop(self) -> None:
        """Finish in-flight requests (up to the exit timeout), stop Triton, flush the registry, close the episode."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            if self.triton is not None:
                self.triton.stop()
        finally:
            if self.service is not None:
                self.service.store.flush()
            if self._owns_episode and self._episode is not None and hasattr(self._episode, "close"):
                self._episode.close()
            self._logdir.cleanup()
            self._released.set()

    def __enter__(self) -> FSSAMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def handshake_missed(exc: BaseException) -> bool:
    """Whether Triton failed to load a model because an instance missed PyTriton's config handshake with this
    process, which a fresh start gets past. Each instance after the first asks the first one's handshake
    server (a Unix socket) for its config, within a fixed 1 s: on a loaded CPU it times out ("waiting for
    config file"), or connects between that server's bind() and listen() and is refused (seen in CI:
    ConnectionRefusedError in get_config_from_handshake_server)."""
    msg = str(exc)
    return "get_config_from_handshake_server" in msg or "waiting for config file" in msg


class StartInterrupted(KeyboardInterrupt):
    """SIGTERM / SIGINT while the server was starting (loading, warming up: minutes for a compiled backend)."""


def serve(settings: ServeSettings, cfg, ready=None) -> int:
    """Run the service until SIGTERM / SIGINT, then stop it cleanly; returns 0 (128 + the signal's number when
    one came while it was starting). `ready(server)` is called once it answers (the CLI prints the URLs).

    While it starts, a signal interrupts the start at once (a compiled backend's warm-up can take minutes) and
    what was opened is closed; once it answers, a signal lets the requests in flight finish first."""
    done = threading.Event()
    state = {"starting": True}

    def on_signal(signum, frame):
        if state["starting"]:
            raise StartInterrupted(signal.Signals(signum).name)
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = FSSAMServer(settings, cfg)
        try:
            server.start()
            state["starting"] = False
        except StartInterrupted as exc:
            server.stop()  # done already if it came inside start(); idempotent
            print(f"fssam serve: stopped by {exc} while starting; nothing was served", file=sys.stderr, flush=True)
            return 128 + int(signal.Signals[str(exc)])
        try:
            if ready is not None:
                ready(server)
            while not done.wait(1.0):
                if not server.is_alive():
                    raise EngineError("the Triton server process exited unexpectedly; run again with --verbose "
                                      "to see its log")
        finally:
            server.stop()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
