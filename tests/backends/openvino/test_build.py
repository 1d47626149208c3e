"""`fssam build --format openvino`: IR and manifest from the tiny fp32 graphs; what the build refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fssam_deploy.backends.openvino.build import build_openvino, parse_batch
from fssam_deploy.backends.openvino.manifest import OPENVINO_FORMAT, read_openvino_manifest
from fssam_deploy.backends.registry import BuildRequest, build_formats, get
from fssam_deploy.errors import ConfigError, EngineError
from fssam_deploy.hostinfo import cpu_info
from fssam_deploy.manifest import Manifest
from fssam_deploy.model.checkpoint import file_sha256
from fssam_deploy.stages import STAGE_SPECS
from tests.backends.openvino.helpers import edit_manifest, linked_copy


def test_registry_entries():
    assert build_formats()["openvino"].name == "openvino"
    for name, accuracy in (("openvino", "exact"), ("openvino-bf16", "fast"), ("openvino-int8", "fast"),
                           ("openvino-int8-bf16", "fast")):
        b = get(name)
        assert (b.accuracy, b.devices, b.engine_format) == (accuracy, ("cpu",), OPENVINO_FORMAT)
    assert "runs on cpu only" in get("openvino").unavailable("cuda")
    assert get("openvino-int8-bf16").loads_precision("int8") and not get("openvino-int8-bf16").loads_precision("fp32")


def test_fp32_build_manifest(ov_fp32, tiny_graphs, tiny_cfg):
    m = read_openvino_manifest(ov_fp32, tiny_cfg)
    assert (m["format"], m.precision, m["inference_precision"], m["batch"]) == (OPENVINO_FORMAT, "fp32", "f32",
                                                                                 "dynamic")
    assert m["device"]["name"] == cpu_info()["model"] and m["device"]["features"] == cpu_info()["features"]
    import openvino

    assert m["versions"]["openvino"] == openvino.__version__
    source = json.loads((Path(tiny_graphs) / "manifest.json").read_text())
    assert m["source"]["manifest_sha256"] == file_sha256(Path(tiny_graphs) / "manifest.json")
    for name in STAGE_SPECS:
        entry = m["stages"][name]
        assert entry["source"]["sha256"] == source["stages"][name]["sha256"]
        assert m.artifact(name, "IR") == Path(ov_fp32) / f"{name}.xml"
        assert set(entry["data_files"]) == {f"{name}.bin"}
    assert m.unlisted_files() == []  # the folder holds what the manifest lists, nothing else


def test_build_through_registry_needs_onnx_dir(tmp_path, tiny_cfg):
    req = BuildRequest(cfg=tiny_cfg, out=tmp_path / "ov", device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="--format openvino needs --onnx-dir"):
        get("openvino").build(req)


def test_refuses_unknown_precision(tiny_graphs, tmp_path):
    with pytest.raises(ConfigError, match=r"--precision 'fp16': the openvino format takes \['fp32', 'bf16', 'int8'\]"):
        build_openvino(tiny_graphs, tmp_path / "ov", precision="fp16")
    assert not (tmp_path / "ov").exists()


def test_refuses_non_fp32_graphs(tiny_graphs, tmp_path):
    src = linked_copy(tiny_graphs, tmp_path / "graphs")
    edit_manifest(src, lambda d: d.update(precision="fp16"))
    with pytest.raises(EngineError, match="OpenVINO IR is converted from fp32 graphs"):
        build_openvino(src, tmp_path / "ov")
    assert not (tmp_path / "ov").exists()


class _Source:
    def __init__(self, batch):
        self.data, self.folder = {"batch": batch}, Path("graphs")

    def __getitem__(self, key):
        return self.data[key]


@pytest.mark.parametrize("batch", ["0", "two", "-1"])
def test_batch_must_be_positive_or_dynamic(batch):
    with pytest.raises(ConfigError, match="give a positive int"):
        parse_batch(batch, _Source("dynamic"))


def test_static_graphs_take_only_their_batch():
    assert parse_batch("1", _Source("1")) == "1"
    assert parse_batch(4, _Source("dynamic")) == "4"
    with pytest.raises(ConfigError, match="static batch 1; --batch 2 needs graphs exported with"):
        parse_batch("2", _Source("1"))


def test_manifest_reader_is_the_shared_one(ov_fp32):
    assert isinstance(read_openvino_manifest(ov_fp32), Manifest)
