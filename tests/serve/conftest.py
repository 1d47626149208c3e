"""Serve fixtures: synthetic support/query files, and ONE server per session (free loopback ports, always stopped).

The server tests need nvidia-pytriton and tritonclient (`pip install 'fssam-deploy[serve]'`, numpy<2); without
them they are skipped. The store / codec / model tests run everywhere.
"""

from __future__ import annotations

import io

import numpy as np
import pytest


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="session")
def episode_files(tmp_path_factory):
    """Two synthetic episodes as files of odd sizes: {"query": [paths], "supports": [[paths]], "masks": [[paths]]}."""
    from fssam_deploy.synthetic import synthetic_episode

    d = tmp_path_factory.mktemp("serve-files")
    out = {"query": [], "supports": [], "masks": []}
    for e, (h, w) in enumerate([(200, 300), (240, 180)]):
        q, _, sup, masks = synthetic_episode(320, shots=2, seed=10 + e)
        crop = lambda a, h=h, w=w: a[:h, :w]  # noqa: E731
        qp = d / f"q{e}.jpg"
        qp.write_bytes(jpeg_bytes(crop(q)))
        sp, mp = [], []
        for k, (s, m) in enumerate(zip(sup, masks)):
            sp.append(d / f"s{e}_{k}.png")
            sp[-1].write_bytes(png_bytes(crop(s)))
            mp.append(d / f"m{e}_{k}.png")
            mp[-1].write_bytes(png_bytes((crop(m) * 255).astype(np.uint8)))
        out["query"].append(qp)
        out["supports"].append(sp)
        out["masks"].append(mp)
    return out


@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def server(tiny_cfg, tiny_pipeline, registry_dir):
    """The session's server: torch backend, tiny config, seed 0, registry folder, free loopback ports."""
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.http")
    from fssam_deploy.serve.codec import Limits
    from fssam_deploy.serve.server import FSSAMServer, ServeSettings

    st = ServeSettings(http_port=0, grpc_port=0, metrics_port=0, registry=str(registry_dir), max_batch=8,
                       instances=2, limits=Limits(max_request_bytes=4 << 20), exit_timeout_s=5)
    srv = FSSAMServer(st, tiny_cfg, episode=tiny_pipeline)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server):
    from fssam_deploy.client import FSSAMClient

    with FSSAMClient(server.http_url, timeout_s=300) as c:
        yield c
