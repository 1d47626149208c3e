"""`FSSAMServer.start` gets past PyTriton's start-up handshake race (a fresh Triton, up to START_ATTEMPTS), and
stops everything it opened on any other error. Triton is a stand-in here (no tritonserver needed), so the race
that CI met once (ConnectionRefusedError in get_config_from_handshake_server) is replayed on every run."""

from __future__ import annotations

import sys
import types

import pytest

from fssam_deploy.serve import server as server_mod
from fssam_deploy.serve.server import START_ATTEMPTS, FSSAMServer, ServeSettings, handshake_missed

# the two messages PyTriton's model load fails with when an instance misses the handshake (the first as CI saw it)
REFUSED = ("[400] load failed for model 'fssam_segment_cached': version 1 is at UNAVAILABLE state: Internal: "
           "TritonModelException: Model initialize error: Traceback (most recent call last):\n  File "
           "\"/tmp/folderBwhNXU/1/model.py\", line 425, in initialize\n    inference_handler_config = "
           "get_config_from_handshake_server(handshake_socket)\n  File \"/tmp/folderBwhNXU/1/communication.py\", "
           "line 550, in get_config_from_handshake_server\n    sock.connect(socket_path.as_posix())\n"
           "ConnectionRefusedError: [Errno 111] Connection refused")
TIMED_OUT = ("[400] load failed for model 'fssam_segment': TimeoutError: Timeout occurred while waiting for config "
             "file /tmp/folderX/fssam_segment-config.sock")
OTHER = "[400] load failed for model 'fssam_segment': Internal: ModuleNotFoundError: No module named 'numpy'"


class LoadFailed(Exception):
    """Stands in for tritonclient's InferenceServerException (only its message is read)."""


def test_handshake_missed_reads_both_failure_messages():
    assert handshake_missed(LoadFailed(REFUSED))
    assert handshake_missed(LoadFailed(TIMED_OUT))
    assert not handshake_missed(LoadFailed(OTHER))
    assert not handshake_missed(ConnectionRefusedError(111, "Connection refused"))  # a client's, not the stub's


@pytest.fixture
def fake_triton(monkeypatch):
    """A stand-in `pytriton.triton` whose run() raises the queued failures in order, then starts; it records
    every Triton made and whether each was stopped."""
    made: list = []
    failures: list = []

    class Triton:
        def __init__(self, config=None, security_config=None):
            self.stopped = False
            self.running = False
            made.append(self)

        def run(self):
            if failures:
                raise failures.pop(0)
            self.running = True

        def stop(self):
            self.stopped = True
            self.running = False

        def is_alive(self):
            return self.running

    mod = types.ModuleType("pytriton.triton")
    mod.Triton = Triton
    mod.TritonConfig = lambda **kw: kw
    mod.TritonSecurityConfig = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "pytriton", types.ModuleType("pytriton"))
    monkeypatch.setitem(sys.modules, "pytriton.triton", mod)
    monkeypatch.setattr(server_mod, "bind_models", lambda *a, **kw: None)
    return made, failures


def _server(tiny_cfg, tiny_pipeline):
    st = ServeSettings(http_port=0, grpc_port=0, metrics_port=0, warmup=False)
    return FSSAMServer(st, tiny_cfg, episode=tiny_pipeline)


def test_missed_handshake_starts_a_fresh_triton(fake_triton, tiny_cfg, tiny_pipeline, capsys):
    made, failures = fake_triton
    failures += [LoadFailed(REFUSED), LoadFailed(TIMED_OUT)]
    srv = _server(tiny_cfg, tiny_pipeline)
    try:
        srv.start()
        assert len(made) == 3 and [t.stopped for t in made] == [True, True, False]
        assert srv.is_alive()
        err = capsys.readouterr().err
        assert "missed PyTriton's start-up handshake" in err and f"attempt 3 of {START_ATTEMPTS}" in err
    finally:
        srv.stop()
    assert made[-1].stopped and not srv.is_alive()


def test_start_gives_up_after_the_last_attempt_and_on_other_errors(fake_triton, tiny_cfg, tiny_pipeline):
    made, failures = fake_triton
    failures += [LoadFailed(REFUSED)] * START_ATTEMPTS
    with pytest.raises(LoadFailed, match="Connection refused"):
        _server(tiny_cfg, tiny_pipeline).start()
    assert len(made) == START_ATTEMPTS and all(t.stopped for t in made)

    made.clear()
    failures[:] = [LoadFailed(OTHER)]
    with pytest.raises(LoadFailed, match="numpy"):  # not the handshake: no second try
        _server(tiny_cfg, tiny_pipeline).start()
    assert len(made) == 1 and made[0].stopped
