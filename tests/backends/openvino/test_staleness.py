"""A folder that cannot be trusted here is refused, naming the file and the command that rebuilds it."""

from __future__ import annotations

import pytest

from fssam_deploy.backends.openvino.manifest import read_openvino_manifest
from fssam_deploy.backends.openvino.runner import openvino_episode
from fssam_deploy.backends.registry import open_backend
from fssam_deploy.errors import ConfigError, EngineError
from tests.backends.openvino.helpers import edit_manifest, linked_copy, replace_file

REBUILD = "rebuild it with `fssam build --format openvino --onnx-dir"


@pytest.fixture
def copy(ov_fp32, tmp_path):
    return linked_copy(ov_fp32, tmp_path / "ov")


def test_other_config(copy, tiny_cfg):
    with pytest.raises(EngineError, match=r"IR built for another config .*'shots': \(1, 5\).*" + REBUILD):
        read_openvino_manifest(copy, tiny_cfg.replace(shots=5))


def test_changed_file(copy):
    replace_file(copy / "prior.bin", b"\0" * 260)
    with pytest.raises(EngineError, match=r"prior.bin: IR of stage 'prior' does not match the manifest's sha256"):
        openvino_episode(copy)


def test_missing_file(copy):
    (copy / "decoder.xml").unlink()
    with pytest.raises(EngineError, match=r"decoder.xml: IR of stage 'decoder' is missing; " + REBUILD):
        openvino_episode(copy)


def test_other_cpu_model(copy):
    edit_manifest(copy, lambda d: d["device"].update(name="Intel(R) Xeon(R) Platinum 8480+"))
    with pytest.raises(EngineError, match=r"built on CPU 'Intel\(R\) Xeon\(R\) Platinum 8480\+', this is .*on this "
                                          "machine"):
        read_openvino_manifest(copy)


def test_other_isa(copy):
    def flip(d):
        d["device"]["features"]["amx_bf16"] = not d["device"]["features"]["amx_bf16"]

    edit_manifest(copy, flip)
    with pytest.raises(EngineError, match=r"ISA features differ from this one's in \['amx_bf16'\]"):
        read_openvino_manifest(copy)


def test_other_openvino(copy):
    edit_manifest(copy, lambda d: d["versions"].update(openvino="2024.0.0"))
    with pytest.raises(EngineError, match=r"built with OpenVINO 2024.0.0, this is OpenVINO .*" + REBUILD):
        read_openvino_manifest(copy)


def test_source_exported_again(copy, tmp_path):
    src = tmp_path / "graphs"
    src.mkdir()
    (src / "manifest.json").write_text('{"format": "fssam-onnx/1", "re-exported": true}')
    edit_manifest(copy, lambda d: d["source"].update(dir=str(src)))
    with pytest.raises(EngineError, match=r"its source graphs in .*graphs were exported again after this build"):
        read_openvino_manifest(copy)


def test_source_gone_is_fine(copy, tmp_path):
    edit_manifest(copy, lambda d: d["source"].update(dir=str(tmp_path / "deleted")))
    assert read_openvino_manifest(copy).precision == "fp32"


def test_not_an_ir_folder(tiny_graphs, tmp_path):
    with pytest.raises(EngineError, match=r"format 'fssam-onnx/1', expected 'fssam-openvino/1'"):
        read_openvino_manifest(tiny_graphs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match=r"no manifest, not an OpenVINO IR folder"):
        read_openvino_manifest(tmp_path / "empty")
    with pytest.raises(EngineError, match=r"gone: not a folder; rebuild it with `fssam build --format openvino "
                                          r"--onnx-dir GRAPHS --out .*gone --precision fp32\|bf16\|int8`"):
        read_openvino_manifest(tmp_path / "gone")  # its precision is unknown: every choice named


def test_int8_backend_refuses_fp32_ir(ov_fp32, tiny_cfg):
    with pytest.raises(EngineError, match=r"fp32 IR; --backend openvino-int8 needs int8 IR: `fssam build --format "
                                          r"openvino .*--precision int8`"):
        open_backend("openvino-int8", tiny_cfg, engine_dir=ov_fp32)


def test_needs_engine_dir(tiny_cfg):
    with pytest.raises(ConfigError, match=r"--backend openvino needs --engine-dir \(written by `fssam build --format "
                                          "openvino"):
        open_backend("openvino", tiny_cfg)
