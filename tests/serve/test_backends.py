"""The service over the engines of the registry, not only PyTorch: `fssam serve --backend onnxruntime|openvino
--engine-dir DIR` opens its own episode from the folder (the CLI's path), and its masks are those of the same
backend in process (`fssam run --backend ... --engine-dir DIR`), and within fp32 rounding of PyTorch's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fssam_deploy.errors import InputError

pytestmark = pytest.mark.pytriton
pytest.importorskip("pytriton", reason="the live-server tests need the serving environment (nvidia-pytriton, "
                    "numpy<2): bash quickstart.sh test-serve")
pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def engine_dirs(tiny_graphs, tmp_path_factory):
    """backend -> its artifacts: the session's tiny ONNX graphs, and OpenVINO IR built from them."""
    dirs = {"onnxruntime": tiny_graphs}
    try:
        import openvino  # noqa: F401
    except ImportError:
        return dirs
    from fssam_deploy.backends.openvino.build import build_openvino

    dirs["openvino"] = build_openvino(tiny_graphs, tmp_path_factory.mktemp("serve-ov") / "fp32")
    return dirs


def _in_process(backend, cfg, engine_dir, files):
    from fssam_deploy.backends.registry import open_backend
    from fssam_deploy.episode_files import load_supports, segment_queries

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open_backend(backend, cfg, engine_dir=engine_dir and str(engine_dir), seed=0) as ep:
            sup = load_supports(files["supports"][0][:1], files["masks"][0][:1], cfg.image_size)
            return list(segment_queries(ep, sup, files["query"]))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_engine_backends_serve_the_masks_of_fssam_run(backend, engine_dirs, tiny_cfg, episode_files, tmp_path):
    from fssam_deploy.client import FSSAMClient
    from fssam_deploy.serve.server import FSSAMServer, ServeSettings

    if backend not in engine_dirs:
        pytest.skip(f"{backend} is not installed")
    f = episode_files
    want = _in_process(backend, tiny_cfg, engine_dirs[backend], f)
    torch_want = _in_process("torch", tiny_cfg, None, f)
    st = ServeSettings(backend=backend, engine_dir=str(engine_dirs[backend]), http_port=0, grpc_port=0,
                       metrics_port=0, registry=str(tmp_path / "registry"), max_batch=4, exit_timeout_s=5)
    with FSSAMServer(st, tiny_cfg) as srv, FSSAMClient(srv.http_url, timeout_s=300) as c:
        with pytest.raises(InputError, match="support"):  # the graphs are 1-shot: a 2-shot set is refused
            c.register(f["supports"][0], f["masks"][0])
        sup, masks = f["supports"][0][:1], f["masks"][0][:1]
        sid = c.register(sup, masks)
        for q, w, t in zip(f["query"], want, torch_want):
            for mask, logits in (c.segment(q, support_id=sid),
                                 c.segment(q, supports=sup, masks=masks)):
                np.testing.assert_array_equal(mask, w.mask)
                np.testing.assert_allclose(logits, w.logits, atol=1e-5)
                inter, union = np.logical_and(mask, t.mask).sum(), np.logical_or(mask, t.mask).sum()
                assert union == 0 or inter / union >= 0.999, f"{backend} vs PyTorch fp32: IoU {inter / union}"
    assert (tmp_path / "registry" / f"{sid}.safetensors").is_file()
