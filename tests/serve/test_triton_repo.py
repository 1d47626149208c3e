"""`fssam export --triton-repo`: configs parsed by Triton's protobuf schema, the BLS model's calls = the repository's
models, and the BLS episode (run over ONNX Runtime with a stand-in for Triton's pb_utils) = the PyTorch episode."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2")

from fssam_deploy.errors import ConfigError, EngineError  # noqa: E402
from fssam_deploy.serve import bls_model  # noqa: E402
from fssam_deploy.serve.triton_repo import BLS_NAME, check_repo, write_triton_repo  # noqa: E402
from fssam_deploy.stages import STAGE_SPECS  # noqa: E402


def _fake_source(d: Path, batch="dynamic") -> Path:
    import onnx
    from onnx import TensorProto, helper

    from fssam_deploy.model import FSSAMConfig

    d.mkdir()
    stages = {}
    for name, spec in STAGE_SPECS.items():  # stand-in graphs with the stages' I/O names (Identity nodes)
        first = spec.input_names[0]
        vi = lambda names: [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]  # noqa: E731
        graph = helper.make_graph([helper.make_node("Identity", [first], [o]) for o in spec.output_names], name,
                                  vi(spec.input_names), vi(spec.output_names))
        onnx.save(helper.make_model(graph), str(d / f"{name}.onnx"))
        stages[name] = {"file": f"{name}.onnx"}
    (d / "manifest.json").write_text(json.dumps({"config": FSSAMConfig.from_name("tiny").to_dict(), "batch": batch,
                                                 "weights": "random:0", "stages": stages}))
    return d


def test_configs_parse_with_tritons_schema(tmp_path):
    repo = write_triton_repo(_fake_source(tmp_path / "g"), tmp_path / "repo", max_batch=4, instances=2)
    configs = check_repo(repo)
    assert set(configs) == {*STAGE_SPECS, BLS_NAME}
    enc = configs["image_encoder"]
    assert enc.backend == "onnxruntime" and enc.max_batch_size == 4 and enc.instance_group[0].count == 2
    assert enc.HasField("dynamic_batching")
    assert [i.name for i in enc.input] == STAGE_SPECS["image_encoder"].input_names
    assert list(enc.input[0].dims) == [3, 256, 256]
    assert configs[BLS_NAME].backend == "python"
    src = (tmp_path / "g" / "image_encoder.onnx").read_bytes()
    assert (repo / "image_encoder" / "1" / "model.onnx").read_bytes() == src
    trt = check_repo(write_triton_repo(_fake_source(tmp_path / "t"), tmp_path / "trt", platform="tensorrt", gpu=True))
    assert trt["decoder"].platform == "tensorrt_plan" and (tmp_path / "trt" / "decoder" / "1" / "model.plan").is_file()
    (repo / "prior" / "config.pbtxt").write_text("name: 'prior' max_batch_size: banana")
    with pytest.raises(EngineError, match="prior/config.pbtxt: not a valid Triton model config"):
        check_repo(repo)


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="export them with `fssam export --batch dynamic`"):
        write_triton_repo(_fake_source(tmp_path / "g", batch="1"), tmp_path / "repo")
    with pytest.raises(EngineError, match="no manifest.json"):
        write_triton_repo(tmp_path, tmp_path / "repo2")
    with pytest.raises(ConfigError, match="--triton-platform 'trt'"):
        write_triton_repo(tmp_path, tmp_path / "repo3", platform="trt")
    assert not (tmp_path / "repo").exists()


def test_bls_calls_exactly_the_repository_models(tmp_path):
    repo = write_triton_repo(_fake_source(tmp_path / "g"), tmp_path / "repo")
    tree = ast.parse((repo / BLS_NAME / "1" / "model.py").read_text())
    called = {c.args[0].value for c in ast.walk(tree)
              if isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "_run"}
    assert called == set(check_repo(repo)) - {BLS_NAME}


class _PB:
    """A stand-in for Triton's `triton_python_backend_utils`: BLS requests run the repository's ONNX graphs."""

    class Tensor:
        def __init__(self, name, arr):
            self.name, self.arr = name, arr

        def as_numpy(self):
            return self.arr

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.outputs, self.error_ = {t.name: t for t in output_tensors or []}, error

        def has_error(self):
            return self.error_ is not None

        def error(self):
            return self.error_

    TritonModelException = RuntimeError

    class TritonError:
        def __init__(self, msg):
            self.msg = msg

        def message(self):
            return self.msg

    def __init__(self, repo):
        import onnxruntime as ort

        self.sessions = {n: ort.InferenceSession(str(repo / n / "1" / "model.onnx")) for n in STAGE_SPECS}
        self.calls = []
        pb = self

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs):
                self.model, self.outs, self.inputs = model_name, requested_output_names, inputs

            def exec(self):
                pb.calls.append(self.model)
                res = pb.sessions[self.model].run(self.outs, {t.name: t.arr for t in self.inputs})
                return pb.InferenceResponse([pb.Tensor(n, a) for n, a in zip(self.outs, res)])

        self.InferenceRequest = InferenceRequest

    @staticmethod
    def get_input_tensor_by_name(req, name):
        return req.get(name)

    @staticmethod
    def get_output_tensor_by_name(resp, name):
        return resp.outputs[name]


def test_bls_episode_matches_pytorch(tiny_graphs, tiny_pipeline, tmp_path):
    import torch

    from fssam_deploy.synthetic import episode_tensors

    repo = write_triton_repo(tiny_graphs, tmp_path / "repo", registry_dir=str(tmp_path / "reg"))
    spec = importlib.util.spec_from_file_location("bls_under_test", repo / BLS_NAME / "1" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.TritonPythonModel()
    model.pb, model.model_key, model.registry = _PB(repo), "test", str(tmp_path / "reg")
    model.load_stages(str(repo / BLS_NAME / "1" / "stages.json"))
    (tmp_path / "reg").mkdir()
    q, s, m = episode_tensors(tiny_pipeline.cfg, batch=1, shots=1, seed=5)
    with torch.inference_mode():
        want = tiny_pipeline.segment(q, s, m)[0].numpy()
    T = model.pb.Tensor
    (r1,) = model.execute([{"query": T("query", q[0].numpy()), "supports": T("supports", s[0].numpy()),
                            "support_masks": T("support_masks", m[0].numpy())}])
    assert not r1.has_error()
    sid = r1.outputs["support_id"].arr[0]
    (r2,) = model.execute([{"query": T("query", q[0].numpy()), "support_id": T("support_id", np.array([sid]))}])
    for r in (r1, r2):
        got = r.outputs["logits"].arr
        np.testing.assert_allclose(got, want, atol=1e-3)
        assert ((got > 0) == (want > 0)).mean() > 0.999
    assert set(model.pb.calls) == set(STAGE_SPECS)
    (bad,) = model.execute([{"query": T("query", q[0].numpy()), "support_id": T("support_id", np.array([b"0" * 64]))}])
    assert bad.has_error() and "unknown support set" in bad.error().message()
    assert bls_model.ID_RE.match(sid.decode())


def test_export_triton_repo_cli(tiny_graphs, tmp_path, monkeypatch, capsys):
    """`fssam export --triton-repo`: refusals before any export, then the repository beside the graphs. The export
    itself is the session's tiny one (copied: `export_onnx` is what tests/onnx checks)."""
    import shutil

    from fssam_deploy.cli import main
    from fssam_deploy.onnx import export as onnx_export
    from tests.helpers import TINY_FLAGS

    def no_export(*a, **k):
        raise AssertionError("exported before refusing")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    (tmp_path / "taken").mkdir()
    for extra, msg in ((["--triton-repo", str(tmp_path / "taken")], "exists; give a new folder"),
                       (["--triton-repo", str(tmp_path / "r"), "--batch", "1"], "add --batch dynamic"),
                       (["--triton-repo", str(tmp_path / "r"), "--batch", "dynamic", "--precision", "bf16"],
                        "no bf16 kernels"),
                       (["--triton-repo", str(tmp_path / "r"), "--batch", "dynamic", "--triton-max-batch", "0"],
                        "--triton-max-batch")):
        assert main(["export", *TINY_FLAGS, "--out", str(tmp_path / "g"), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and msg in err[-1], err
    monkeypatch.setattr(onnx_export, "export_onnx", lambda cfg, out, **k: Path(shutil.copytree(tiny_graphs, out)))
    repo = tmp_path / "repo"
    assert main(["export", *TINY_FLAGS, "--out", str(tmp_path / "g"), "--batch", "dynamic", "--triton-repo",
                 str(repo), "--triton-max-batch", "4", "--triton-instances", "2"]) == 0
    assert f"wrote {repo}/ (Triton model repository" in capsys.readouterr().out
    configs = check_repo(repo)
    assert set(configs) == {*STAGE_SPECS, BLS_NAME}
    assert configs["decoder"].max_batch_size == 4 and configs["decoder"].instance_group[0].count == 2
    assert (repo / "decoder" / "1" / "model.onnx").read_bytes() == (tiny_graphs / "decoder.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "repo", "taken"]
