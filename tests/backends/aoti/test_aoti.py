"""AOTInductor packages (tiny config): build, parity with the eager stages, staleness errors.

CPU compile times of the tiny config on 2 cores (export + C++ compile, cold Inductor cache, quiet
machine), measured before DINOv2 left the prior stage: image_encoder ~57 s, prior with DINOv2 ~28 s,
memory_encoder ~28 s, refinement ~19 s, decoder ~42 s; about twice that under load. The six stages are
built once per session through the CLI (`tiny_aoti` in tests/conftest.py, shared with tests/test_cli.py),
from a checkpoint of the seed-0 random weights that the eager stages here use.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

import fssam_deploy.backends.aoti.build as aoti
from fssam_deploy.backends.aoti import manifest as aoti_manifest
from fssam_deploy.backends.aoti.build import build_aoti
from fssam_deploy.backends.aoti.manifest import AOTI_FORMAT, MANIFEST, read_aoti_manifest
from fssam_deploy.backends.aoti.runner import AotiRunner, aoti_episode
from fssam_deploy.backends.pytorch import torch_runners
from fssam_deploy.episode import Episode, run_stage
from fssam_deploy.errors import ConfigError, EngineError, InputError
from fssam_deploy.model import build_stages, random_weights
from fssam_deploy.model.checkpoint import file_sha256
from fssam_deploy.stages import STAGE_SPECS
from tests.helpers import assert_bf16_rounded_close, make_episode

STAGES = list(STAGE_SPECS)
TAIL = ["prior", "refinement", "decoder"]  # the query's stages after the features
ATOL = 1e-4
REBUILD = "rebuild with `fssam build --format aoti"  # the command goes on: --out DIR`


@pytest.fixture(scope="module")
def packages(tiny_aoti):
    """Every stage of the tiny config, compiled for the CPU from seed-0 weights (read-only)."""
    return tiny_aoti


@pytest.fixture(scope="module")
def eager(tiny_cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_stages(random_weights(tiny_cfg, 0), attention_backend="torch")


def _eager_outputs(stages, name, feed):
    with torch.no_grad():
        out = getattr(stages, name)(*(feed[n] for n in STAGE_SPECS[name].input_names))
    return dict(zip(STAGE_SPECS[name].output_names, out if isinstance(out, tuple) else (out,)))


def test_manifest_and_packages(packages, tiny_cfg):
    m = read_aoti_manifest(packages, expect_config=tiny_cfg)
    assert m["format"] == AOTI_FORMAT and m["batch"] == 1 and m["inductor"] == {"emulate_precision_casts": True}
    assert m["weights"] == f"sha256:{file_sha256(packages.parent / 'ckpt.pth')}"
    assert m["versions"]["torch"] == torch.__version__
    assert m["device"]["type"] == "cpu" and m["device"]["name"]
    assert sorted(m["stages"]) == sorted(STAGES)
    for name, entry in m["stages"].items():
        spec = STAGE_SPECS[name]
        assert [i["name"] for i in entry["inputs"]] == spec.input_names
        assert [o["name"] for o in entry["outputs"]] == spec.output_names
        assert [tuple(i["shape"]) for i in entry["inputs"]] == [spec.shapes(tiny_cfg, 1, 1)[n]
                                                               for n in spec.input_names]
        assert entry["sha256"] == file_sha256(packages / entry["file"])
    assert not list(packages.parent.glob(".packages.*")), "temporary build dir left behind"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", STAGES)
def test_stage_parity(packages, eager, tiny_cfg, name, seed):
    feed = STAGE_SPECS[name].dummy_inputs(tiny_cfg, batch=1, shots=1, seed=seed)
    with AotiRunner(packages, name, expect_config=tiny_cfg) as runner:
        got = runner.infer(feed)
        assert runner.last_latency_s is not None and runner.last_latency_s > 0
    want = _eager_outputs(eager, name, feed)
    assert list(got) == list(want)
    for k in want:
        if STAGE_SPECS[name].output(k).bf16_rounded:
            assert_bf16_rounded_close(got[k], want[k], f"{name}.{k}", rtol=ATOL)
        else:
            torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=ATOL, msg=lambda m, k=k: f"{name}.{k}: {m}")


def test_query_tail_matches_pipeline(packages, tiny_pipeline, tiny_cfg):
    """One Episode over mixed backends: eager image encoder, DINOv2 and memory encoder, AOTI prior,
    refinement and decoder; the logits of Pipeline.segment."""
    query, supports, masks = make_episode(tiny_cfg, batch=1, shots=1, seed=3)
    runners = torch_runners(tiny_pipeline.stages, tiny_cfg)
    runners.update({name: AotiRunner(packages, name, expect_config=tiny_cfg) for name in TAIL})
    with Episode(runners, tiny_cfg, "cpu") as episode:
        logits = episode.segment(query, supports, masks)
        assert all(episode.runners[name].last_latency_s for name in TAIL)
    want = tiny_pipeline.segment(query, supports, masks)
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=ATOL)
    assert torch.equal(logits > 0, want > 0)


def test_larger_batch_runs_in_chunks(packages, eager, tiny_cfg):
    feed = STAGE_SPECS["refinement"].dummy_inputs(tiny_cfg, batch=3, shots=1, seed=5)
    with AotiRunner(packages, "refinement") as runner:
        got = run_stage(runner, feed)
    torch.testing.assert_close(got["query_memory"], _eager_outputs(eager, "refinement", feed)["query_memory"],
                               atol=ATOL, rtol=ATOL)


def test_runner_validates_inputs(packages, tiny_cfg):
    feed = STAGE_SPECS["refinement"].dummy_inputs(tiny_cfg, batch=1, shots=1)
    runner = AotiRunner(packages, "refinement")
    with pytest.raises(RuntimeError, match="activate the runner first"):
        runner.infer(feed)
    with runner:
        with pytest.raises(InputError, match=r"missing \['prior_ae'\]"):
            runner.infer({k: v for k, v in feed.items() if k != "prior_ae"})
        with pytest.raises(InputError, match="'query_fg_memory' has shape"):
            runner.infer({**feed, "query_fg_memory": feed["query_fg_memory"][..., :8]})
        with pytest.raises(InputError, match="must be float32"):
            runner.infer({**feed, "prior_fg": feed["prior_fg"].double()})


def _copy(packages, dest, files=(MANIFEST,)):
    dest.mkdir()
    for f in files:
        shutil.copy(packages / f, dest / f)
    return dest


def _edit_manifest(folder, edit):
    m = json.loads((folder / MANIFEST).read_text())
    edit(m)
    (folder / MANIFEST).write_text(json.dumps(m))


STALE = {
    "config": (lambda m: m["config"].update(num_refine=2), "built for another config"),
    "torch": (lambda m: m["versions"].update(torch="1.0.0"), "built with torch 1.0.0"),
    "device type": (lambda m: m["device"].update(type="cuda", name="NVIDIA H100", capability="9.0"),
                    "built for device type 'cuda', asked to run on 'cpu'"),
    "cpu isa": (lambda m: m["device"].update(isa="avx512_fake"), "compiled for the avx512_fake vector ISA"),
    "format": (lambda m: m.update(format="fssam-onnx/1"), "expected 'fssam-aoti/1'"),
    "inductor": (lambda m: m.pop("inductor"), "compiled with Inductor's defaults, this version compiles with "
                 "emulate_precision_casts=True .*drops the memory's bf16 rounding"),
}


@pytest.mark.parametrize("what", list(STALE))
def test_stale_manifest(packages, tmp_path, tiny_cfg, what):
    edit, message = STALE[what]
    folder = _copy(packages, tmp_path / "stale")
    _edit_manifest(folder, edit)
    with pytest.raises(EngineError, match=f"{message}.*{REBUILD}"):
        AotiRunner(folder, "refinement", expect_config=tiny_cfg, device="cpu")


def test_other_gpu(packages, tmp_path, monkeypatch):
    """A CUDA package from another GPU (name or compute capability) is refused; no GPU needed to check."""
    folder = _copy(packages, tmp_path / "gpu")
    _edit_manifest(folder, lambda m: m["device"].update(type="cuda", name="NVIDIA A100-SXM4-80GB", capability="8.0"))
    monkeypatch.setattr(aoti_manifest, "device_info",
                        lambda device: {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0"})
    with pytest.raises(EngineError, match=f"built on GPU 'NVIDIA A100-SXM4-80GB'.*{REBUILD}"):
        AotiRunner(folder, "decoder", device="cuda")
    _edit_manifest(folder, lambda m: m["device"].update(name="NVIDIA H100 80GB HBM3", capability="8.0"))
    with pytest.raises(EngineError, match=rf"\(sm 8.0\), this is 'NVIDIA H100 80GB HBM3' \(sm 9.0\).*{REBUILD}"):
        AotiRunner(folder, "decoder")  # device defaults to the built type, cuda


def test_modified_or_missing_package(packages, tmp_path):
    folder = _copy(packages, tmp_path / "mod", files=(MANIFEST, "refinement.pt2"))
    _edit_manifest(folder, lambda m: m["stages"].pop("dino_features"))
    with open(folder / "refinement.pt2", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineError, match=f"does not match the manifest's sha256.*{REBUILD}"):
        AotiRunner(folder, "refinement")
    with pytest.raises(EngineError, match=f"decoder.pt2: package of stage 'decoder' is missing; {REBUILD}"):
        AotiRunner(folder, "decoder")
    with pytest.raises(EngineError, match=f"no package for stage 'dino_features'.*{REBUILD}"):
        AotiRunner(folder, "dino_features")
    with pytest.raises(EngineError, match="no manifest, not an AOTInductor package folder"):
        AotiRunner(tmp_path, "prior")


def test_episode_needs_every_package(packages, tmp_path, tiny_cfg):
    folder = _copy(packages, tmp_path / "part", files=(MANIFEST, *(f"{n}.pt2" for n in TAIL)))
    _edit_manifest(folder, lambda m: m.update(stages={n: m["stages"][n] for n in TAIL}))
    with pytest.raises(EngineError, match="no 'dino_features', 'image_encoder', 'memory_encoder' stage.*an "
                       "episode needs every stage: rebuild with `fssam build --format aoti --out "):
        aoti_episode(folder, expect_config=tiny_cfg)


def test_failed_build_leaves_nothing(tmp_path, tiny_cfg, monkeypatch):
    out = tmp_path / "pk"
    out.mkdir()
    (out / "keep.txt").write_text("old build")

    def boom(module, spec, cfg, path, device, batch, precision="fp32"):
        path.write_bytes(b"half a package")
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(aoti, "compile_stage", boom)
    with pytest.raises(ConfigError, match="keep.txt.*not an artifact folder written by this tool"):
        build_aoti(tiny_cfg, out, stages=["refinement"], progress=False)  # refused before compiling: not ours
    with pytest.raises(RuntimeError, match="compiler crashed"):
        build_aoti(tiny_cfg, out, stages=["refinement"], progress=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pk"], "temporary build dir left behind"
    assert (out / "keep.txt").read_text() == "old build"


def test_bad_requests(tmp_path, tiny_cfg):
    with pytest.raises(ConfigError, match=r"unknown stages \['nope'\]"):
        build_aoti(tiny_cfg, tmp_path / "x", stages=["nope"])
    with pytest.raises(ConfigError, match="batch must be a positive int"):
        build_aoti(tiny_cfg, tmp_path / "x", batch=0)
    assert not list(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the fused Triton attention kernel "
                    "is compiled into the decoder package only on CUDA")
def test_cuda_decoder_package_holds_triton_kernel(tmp_path, tiny_cfg):
    out = build_aoti(tiny_cfg, tmp_path / "cuda", device="cuda", stages=["decoder"], progress=False)
    # Loading a CUDA package crashed the process on torch 2.11 + H200 (SIGSEGV): probe it in a child first
    probe = subprocess.run([sys.executable, "-c", "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])",
                            str(out / "decoder.pt2")], capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, (f"aoti_load_package crashed (exit {probe.returncode}) on torch {torch.__version__}, "
                                   f"{torch.cuda.get_device_name()}: {probe.stderr[-2000:]}")
    m = read_aoti_manifest(out, expect_config=tiny_cfg, device="cuda")
    assert m["device"]["name"] == torch.cuda.get_device_name() and m["device"]["capability"]
    with zipfile.ZipFile(out / "decoder.pt2") as z:
        sources = [z.read(n).decode(errors="ignore") for n in z.namelist() if n.endswith(".cpp")]
        names = z.namelist()
    assert any("calibrated_attn" in n for n in names) or any("calibrated_attn" in s for s in sources), \
        "the fused calibrated-attention Triton kernel is not in the CUDA decoder package"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stages = build_stages(random_weights(tiny_cfg, 0).to("cuda"), attention_backend="op")
    feed = {k: v.cuda() for k, v in STAGE_SPECS["decoder"].dummy_inputs(tiny_cfg, batch=1, shots=1).items()}
    with AotiRunner(out, "decoder", expect_config=tiny_cfg, device="cuda") as runner:
        got = runner.infer(feed)["logits"]
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, _eager_outputs(stages, "decoder", feed)["logits"], atol=ATOL, rtol=ATOL)


def test_full_episode_matches_pipeline(packages, tmp_path, tiny_cfg, tiny_pipeline):
    """Every stage from AOTInductor packages (the session's CPU packages; CUDA ones built here on a GPU) == the
    eager Pipeline, for a batch of two queries and for cached supports."""
    if torch.cuda.is_available():
        out = build_aoti(tiny_cfg, tmp_path / "all", device="cuda", progress=False)
    else:
        out = packages
    episode = aoti_episode(out, expect_config=tiny_cfg)
    query, supports, masks = make_episode(tiny_cfg, batch=2, shots=1, seed=1)
    with episode.timing() as times:
        got = episode.segment(query, supports, masks).cpu()
    want = tiny_pipeline.segment(query, supports, masks)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    assert torch.equal(got > 0, want > 0)
    session = episode.with_supports(supports[:1], masks[:1])
    torch.testing.assert_close(session.segment(query).cpu(), tiny_pipeline.with_supports(supports[:1], masks[:1])
                               .segment(query), atol=ATOL, rtol=ATOL)
    assert sorted(times) == sorted(STAGE_SPECS)
    episode.close()
    assert not any(r.is_active for r in episode.runners.values())
