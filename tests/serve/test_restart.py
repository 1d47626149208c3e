"""Servers as processes (`python -m fssam_deploy.serve serve`): a second replica on the session's registry folder,
SIGTERM with four requests in flight (all answered, exit 0, registry flushed), and a restart serving the old ids."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

pytestmark = pytest.mark.pytriton
pytest.importorskip("pytriton", reason="the live-server tests need the serving environment (nvidia-pytriton, "
                    "numpy<2): bash quickstart.sh test-serve")
pytest.importorskip("tritonclient.http")

from fssam_deploy.client import FSSAMClient  # noqa: E402
from fssam_deploy.serve.server import free_port  # noqa: E402

TINY = ["--sam2-config", "sam2_hiera_t", "--dino", "dinov2_vits14", "--image-size", "256", "--seed", "0"]


class ServerProcess:
    """`python -m fssam_deploy.serve serve` on free ports; always stopped on exit (also on failure)."""

    def __init__(self, registry, log, *flags):
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log = open(log, "w")  # noqa: SIM115 - closed in __exit__
        cmd = [sys.executable, "-m", "fssam_deploy.serve", "serve", *TINY, "--registry", str(registry),
               "--http-port", str(self.port), "--grpc-port", str(free_port()), "--metrics-port",
               str(self.metrics_port), *flags]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        deadline = time.monotonic() + 600
        with FSSAMClient(self.url, timeout_s=5) as c:
            while not c.is_ready():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: see {self.log.name}")
                time.sleep(0.5)
        return self

    def metric(self, name: str, model: str) -> float:
        """One of Triton's Prometheus metrics for `model` (a gauge or a counter), read now."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            text = r.read().decode()
        m = re.search(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M)
        assert m, f"no {name} for {model} in the metrics"
        return float(m.group(1))

    def wait_received(self, model: str, n: int, answered0: float, timeout_s: float = 120) -> None:
        """Until the server holds `n` requests of `model` beyond the `answered0` it had answered. Started with
        --max-batch 1 and one instance, one request executes while the others wait, so while any waits the server
        holds pending + answered + 1 (Triton counts no request while it executes)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pending = self.metric("nv_inference_pending_request_count", model)
            answered = self.metric("nv_inference_request_success", model) - answered0
            assert answered < n, "all requests were answered before the test could stop the server with them in flight"
            if pending >= 1 and pending + answered + 1 >= n:
                return
            time.sleep(0.05)
        raise AssertionError(f"the server did not receive {n} requests of {model} in {timeout_s} s: "
                             f"see {self.log.name}")

    def __exit__(self, *exc):
        if self.proc.poll() is None:  # SIGTERM first: a killed server cannot remove its temporary log folder
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=60)
        self.log.close()


def test_replica_sigterm_restart(server, client, episode_files, registry_dir, tmp_path):
    f = episode_files
    sid0 = client.register(f["supports"][0], f["masks"][0])  # registered on the session server
    want0, _ = client.segment(f["query"][1], support_id=sid0)
    with ServerProcess(registry_dir, tmp_path / "b.log", "--max-batch", "1") as b, \
            FSSAMClient(b.url, timeout_s=300) as cb:
        np.testing.assert_array_equal(cb.segment(f["query"][1], support_id=sid0)[0], want0)  # second replica
        sid1 = cb.register(f["supports"][1], f["masks"][1])
        want1, _ = cb.segment(f["query"][0], support_id=sid1)
        inflight = {}

        def in_flight(n):  # its own client: a tritonclient HTTP client is not shared across threads
            with FSSAMClient(b.url, timeout_s=300) as c:
                try:
                    inflight[n] = c.segment(f["query"][0], supports=f["supports"][1], masks=f["masks"][1])[0]
                except Exception as exc:  # noqa: BLE001 - asserted below, with the server's log
                    inflight[n] = exc

        answered0 = b.metric("nv_inference_request_success", "fssam_segment")
        threads = [threading.Thread(target=in_flight, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        b.wait_received("fssam_segment", 4, answered0)  # one executing, three queued: seconds of work each
        b.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=300)
        assert b.proc.wait(timeout=120) == 0, (tmp_path / "b.log").read_text()[-3000:]
        for n in range(4):  # every request in flight or queued at SIGTERM was answered (default --exit-timeout)
            assert isinstance(inflight[n], np.ndarray), (inflight[n], (tmp_path / "b.log").read_text()[-3000:])
            np.testing.assert_array_equal(inflight[n], want1)
    with ServerProcess(registry_dir, tmp_path / "c.log") as c, FSSAMClient(c.url, timeout_s=300) as cc:
        np.testing.assert_array_equal(cc.segment(f["query"][0], support_id=sid1)[0], want1)  # restart: old ids
        np.testing.assert_array_equal(cc.segment(f["query"][1], support_id=sid0)[0], want0)


def test_server_started_from_a_thread_outlives_it(tiny_cfg, tiny_pipeline, episode_files, tmp_path):
    """PyTriton ties tritonserver to the thread that starts it (PR_SET_PDEATHSIG: SIGTERM when that thread ends).
    A server started from a worker thread that then finishes (a restart from a request handler, a benchmark's
    client thread) still answers, and stop() stops it."""
    from fssam_deploy.serve.server import FSSAMServer, ServeSettings

    st = ServeSettings(http_port=0, grpc_port=0, metrics_port=0, registry=str(tmp_path / "reg"), exit_timeout_s=5)
    srv = FSSAMServer(st, tiny_cfg, episode=tiny_pipeline)
    try:
        t = threading.Thread(target=srv.start)
        t.start()
        t.join()
        time.sleep(3)  # tritonserver's SIGTERM, if it came, has been handled by now
        assert srv.is_alive()
        f = episode_files
        with FSSAMClient(srv.http_url, timeout_s=300) as c:
            sid = c.register(f["supports"][0], f["masks"][0])
            mask, _ = c.segment(f["query"][0], support_id=sid)
        assert mask.shape == (200, 300)
    finally:
        srv.stop()
    assert not srv.is_alive()


@pytest.fixture
def owned_tiny(tiny_pipeline, monkeypatch):
    """`serve` / `FSSAMServer` opening the session's tiny pipeline as if it were its own; `closed` counts closes."""
    from fssam_deploy.serve import server as srv

    closed = []
    monkeypatch.setattr(srv, "open_episode", lambda st, cfg: tiny_pipeline)
    monkeypatch.setattr(tiny_pipeline, "close", lambda: closed.append(1))
    return closed


INTERRUPTED = """
import os, signal, sys, time
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.serve import models, server as srv
opened = srv.open_episode
def open_episode(st, cfg):
    ep = opened(st, cfg)
    close = ep.close
    ep.close = lambda: (print("closed", flush=True), close())
    return ep
srv.open_episode = open_episode
def slow(self):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
models.FSSAMService.warm_up = slow
cfg = FSSAMConfig.from_name("tiny")
before = signal.getsignal(signal.SIGTERM)
rc = srv.serve(srv.ServeSettings(http_port=0, grpc_port=0, metrics_port=0), cfg)
print("handler restored" if signal.getsignal(signal.SIGTERM) is before else "handler changed", flush=True)
sys.exit(rc)
"""


def test_signal_while_warming_up_stops_at_once():
    """SIGTERM during the start (a compiled backend's warm-up takes minutes) interrupts it at once: the episode
    is closed, nothing listens, the exit code is 128 + 15, and the signal handlers are the caller's again. In a
    process of its own: a signal in this one would reach the session's server too."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", INTERRUPTED], capture_output=True, text=True, timeout=120)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-2000:]
    assert time.monotonic() - t0 < 45 and "closed" in r.stdout and "handler restored" in r.stdout
    assert "stopped by SIGTERM while starting; nothing was served" in r.stderr


def test_failed_warm_up_is_one_error(owned_tiny, tiny_cfg, monkeypatch):
    """A warm-up that fails stops the start with an EngineError that names the backend and --no-warmup, and
    closes the episode."""
    from fssam_deploy.errors import EngineError
    from fssam_deploy.serve import models
    from fssam_deploy.serve.server import FSSAMServer, ServeSettings

    def boom(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(models.FSSAMService, "warm_up", boom)
    with pytest.raises(EngineError, match=r"warm-up episode failed on backend 'torch' \(RuntimeError: boom\); .*"
                                          r"--no-warmup"):
        FSSAMServer(ServeSettings(http_port=0, grpc_port=0, metrics_port=0), tiny_cfg).start()
    assert owned_tiny == [1]


def test_taken_port_is_one_error_before_loading(owned_tiny, tiny_cfg, monkeypatch):
    """A port something already listens on is a ConfigError naming its flag, raised before the episode is
    opened and warmed up (minutes for a compiled backend), not when Triton binds after that."""
    from fssam_deploy.errors import ConfigError
    from fssam_deploy.serve import server as srv

    opened = []
    monkeypatch.setattr(srv, "open_episode", lambda st, cfg: opened.append(1))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"--grpc-port {port}: cannot listen on 127.0.0.1:{port} .*"
                                              r"pick another port \(0: a free one\)"):
            srv.FSSAMServer(srv.ServeSettings(http_port=0, grpc_port=port, metrics_port=0), tiny_cfg).start()
    assert opened == [] and owned_tiny == []
