"""`fssam export --triton-repo DIR`: a Triton model repository for a full `tritonserver` deployment.

One model per stage of `STAGE_SPECS` on the `onnxruntime` backend (the graphs of an `fssam export --batch
dynamic` folder) or as `tensorrt_plan` (the engines of `fssam build --format tensorrt`), each with dynamic
batching on its first axis and an instance group; plus `fssam_episode`, a Python-backend BLS model
(`serve/bls_model.py`) that runs the episode over them and keeps a support registry. Every `config.pbtxt`
is built as Triton's own protobuf message (`tritonclient.grpc.model_config_pb2.ModelConfig`), written with
protobuf's text format and parsed back (`check_repo`). The folder is written as a temporary sibling and
renamed at the end (`atomic.atomic_dir`).

Run here: the configs parse, and the BLS model's calls match the stage models (tests). Not run here: a full
`tritonserver` with the onnxruntime / tensorrt backends (PyTriton's bundled server holds the Python backend
only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fssam_deploy.atomic import atomic_dir
from fssam_deploy.errors import BackendUnavailableError, ConfigError, EngineError
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.stages import STAGE_SPECS

BLS_NAME = "fssam_episode"
PLATFORMS = ("onnxruntime", "tensorrt")


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise BackendUnavailableError(f"--triton-repo needs tritonclient ({exc}): pip install "
                                      "'fssam-deploy[serve]'") from None
    return model_config_pb2, text_format


def _tensor(pb, msg, name: str, dims: list[int], dtype: str = "TYPE_FP32"):
    t = msg.add()
    t.name, t.data_type = name, pb.DataType.Value(dtype)
    t.dims.extend(dims)
    return t


def graph_io(path: Path) -> tuple[list[str], list[str]]:
    """Input and output names of an ONNX graph (the exporter drops inputs a stage does not read)."""
    import onnx

    try:
        g = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others on a damaged file
        raise EngineError(f"{path}: not a readable ONNX graph ({type(exc).__name__}); export it again") from None
    inits = {i.name for i in g.initializer}
    return [i.name for i in g.input if i.name not in inits], [o.name for o in g.output]


def stage_config(name: str, cfg: FSSAMConfig, platform: str, max_batch: int, instances: int, gpu: bool,
                 io_names: tuple[list[str], list[str]] | None = None):
    """The ModelConfig of one stage: shapes from its StageSpec (the batch axis is Triton's), the tensors the model
    file has (`io_names`; default: every tensor of the spec)."""
    pb, _ = _pb()
    spec = STAGE_SPECS[name]
    c = pb.ModelConfig(name=name, max_batch_size=max_batch)
    if platform == "onnxruntime":
        c.backend = "onnxruntime"
    else:
        c.platform = "tensorrt_plan"
    names = io_names or (spec.input_names, spec.output_names)
    for io, group, keep in ((spec.inputs, c.input, names[0]), (spec.outputs, c.output, names[1])):
        for t in io:
            if t.name in keep:
                _tensor(pb, group, t.name, list(t.concrete(cfg, 1, cfg.shots)[1:]))
    c.dynamic_batching.max_queue_delay_microseconds = 1000
    g = c.instance_group.add()
    g.count, g.kind = instances, pb.ModelInstanceGroup.Kind.Value("KIND_GPU" if gpu else "KIND_CPU")
    return c


def bls_config(cfg: FSSAMConfig, model_key: str, max_batch: int, instances: int, registry_dir: str | None):
    pb, _ = _pb()
    s = cfg.image_size
    c = pb.ModelConfig(name=BLS_NAME, backend="python", max_batch_size=0)
    _tensor(pb, c.input, "query", [3, s, s])
    for n, dims in (("supports", [-1, 3, s, s]), ("support_masks", [-1, s, s])):
        _tensor(pb, c.input, n, dims).optional = True
    _tensor(pb, c.input, "support_id", [1], "TYPE_STRING").optional = True
    _tensor(pb, c.output, "logits", [1, s, s])
    _tensor(pb, c.output, "support_id", [1], "TYPE_STRING")
    g = c.instance_group.add()
    g.count, g.kind = instances, pb.ModelInstanceGroup.Kind.Value("KIND_CPU")
    c.parameters["model_key"].string_value = model_key
    c.parameters["max_batch"].string_value = str(max_batch)
    if registry_dir:
        c.parameters["registry_dir"].string_value = registry_dir
    return c


def _source_files(source: Path, platform: str) -> tuple[FSSAMConfig, dict[str, list[Path]], str]:
    """The config, per stage the files to copy (first = the model file), and the weights id of `source`."""
    manifest = json.loads((source / "manifest.json").read_text()) if (source / "manifest.json").is_file() else None
    if manifest is None:
        raise EngineError(f"{source}: no manifest.json; give the folder written by `fssam export --batch dynamic` "
                          "(or `fssam build --format tensorrt` for --triton-platform tensorrt)")
    if platform == "onnxruntime" and manifest.get("batch") != "dynamic":
        raise ConfigError(f"{source}: graphs exported with --batch {manifest.get('batch')}; Triton batches on the "
                          "first axis, export them with `fssam export --batch dynamic`")
    cfg = FSSAMConfig.from_dict(manifest["config"])
    files = {}
    for name in STAGE_SPECS:
        entry = manifest.get("stages", {}).get(name)
        if entry is None:
            raise EngineError(f"{source}/manifest.json: no stage {name!r}; export every stage")
        main = source / entry["file"]
        files[name] = [main, *(source / d for d in entry.get("data_files", {}))]  # + ONNX external data
    return cfg, files, str(manifest.get("weights", "unknown"))


def write_triton_repo(source: str | Path, out: str | Path, platform: str = "onnxruntime", max_batch: int = 8,
                      instances: int = 1, gpu: bool = False, registry_dir: str | None = None) -> Path:
    """Write the repository `out` from the graphs (or engines) folder `source`; returns `out`."""
    if platform not in PLATFORMS:
        raise ConfigError(f"--triton-platform {platform!r}: choose one of {', '.join(PLATFORMS)}")
    source, out = Path(source), Path(out)
    if out.exists():
        raise ConfigError(f"--triton-repo {out}: exists; give a new folder (nothing is overwritten)")
    cfg, files, weights = _source_files(source, platform)
    _, text_format = _pb()
    with atomic_dir(out) as tmp:  # a temporary sibling of ours, renamed to `out` when whole
        model_file = "model.onnx" if platform == "onnxruntime" else "model.plan"
        stages = {}
        for name, paths in files.items():
            d = tmp / name / "1"
            d.mkdir(parents=True)
            shutil.copy2(paths[0], d / model_file)
            for p in paths[1:]:
                shutil.copy2(p, d / p.name)
            io = graph_io(paths[0]) if platform == "onnxruntime" else None
            c = stage_config(name, cfg, platform, max_batch, instances, gpu, io)
            stages[name] = {"inputs": [t.name for t in c.input], "outputs": [t.name for t in c.output]}
            (tmp / name / "config.pbtxt").write_text(text_format.MessageToString(c))
        key = f"weights={weights}\0config={cfg.to_json()}".replace("\0", ";")
        (tmp / BLS_NAME / "1").mkdir(parents=True)
        shutil.copy2(Path(__file__).with_name("bls_model.py"), tmp / BLS_NAME / "1" / "model.py")
        (tmp / BLS_NAME / "1" / "stages.json").write_text(json.dumps(stages, indent=2))  # what each stage takes
        (tmp / BLS_NAME / "config.pbtxt").write_text(
            text_format.MessageToString(bls_config(cfg, key, max_batch, instances, registry_dir)))
        check_repo(tmp)
    return out


def check_repo(repo: str | Path) -> dict:
    """Parse every `config.pbtxt` with Triton's schema; check names, versions and model files. -> name: config."""
    pb, text_format = _pb()
    repo = Path(repo)
    configs = {}
    for cfg_path in sorted(repo.glob("*/config.pbtxt")):
        c = pb.ModelConfig()
        try:
            text_format.Parse(cfg_path.read_text(), c)
        except text_format.ParseError as exc:
            raise EngineError(f"{cfg_path}: not a valid Triton model config ({exc})") from None
        if c.name != cfg_path.parent.name:
            raise EngineError(f"{cfg_path}: name {c.name!r} differs from its folder {cfg_path.parent.name!r}")
        if not any((cfg_path.parent / "1").glob("model.*")):
            raise EngineError(f"{cfg_path.parent}/1: no model file")
        configs[c.name] = c
    missing = sorted({*STAGE_SPECS, BLS_NAME} - set(configs))
    if missing:
        raise EngineError(f"{repo}: models {missing} missing from the repository")
    return configs
