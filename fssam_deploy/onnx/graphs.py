"""Reading and writing one ONNX graph: weights stored once, the files it consists of, standard-op checks."""

from __future__ import annotations

from pathlib import Path

from fssam_deploy.errors import EngineError
from fssam_deploy.model.checkpoint import file_sha256

STANDARD_DOMAINS = {"", "ai.onnx"}
PROTOBUF_LIMIT = 2**31 - 2**26  # bytes one protobuf message may hold, less a margin for the graph itself


def save_graph(model, path: Path) -> None:
    """Write `model` at `path` with its weights stored once: inside the .onnx when the whole graph fits protobuf's
    2 GB limit (every stage of every config does in fp32: DINOv2 ViT-L is 1.2 GB), else in one `<name>.data`
    beside it. A stale sidecar from an earlier save (the exporter's own) is removed: it is ours."""
    import onnx

    sidecar = path.with_name(path.name + ".data")
    sidecar.unlink(missing_ok=True)
    if model.ByteSize() < PROTOBUF_LIMIT:
        onnx.save(model, str(path))
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving as external data rewrites the initializers it is given
        onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=sidecar.name, size_threshold=1024)


def file_entries(path: Path) -> dict:
    """{"file", "sha256"} of a saved graph, plus {"data_files": {name: sha256}} when it keeps external data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = sorted({e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                    for e in t.external_data if e.key == "location"})
    entry = {"file": path.name, "sha256": file_sha256(path)}
    if names:
        entry["data_files"] = {n: file_sha256(path.parent / n) for n in names}
    return entry


def check_graph(path: Path) -> None:
    """onnx.checker with full shape inference, and only standard-domain ops."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    odd = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})
    if odd:
        raise EngineError(f"{path}: non-standard ops in the graph: {odd}")
