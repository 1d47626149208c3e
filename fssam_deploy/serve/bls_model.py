"""The Python-backend BLS model of a `fssam export --triton-repo` repository (its `fssam_episode/1/model.py`).

It runs inside a full `tritonserver`, imports nothing of fssam_deploy (the stub's environment needs only numpy),
and calls the stage models of the repository by BLS in the order of `episode.Episode`:
support side image_encoder, dino_features, memory_encoder; query side image_encoder, dino_features, prior,
memory_encoder, refinement, decoder. Inputs are model-size float tensors (the client resizes, as
`imageio.image_to_tensor` / `mask_to_tensor` do): `query` (3, S, S) 0..255 and either `supports` (K, 3, S, S) +
`support_masks` (K, S, S) {0, 1} or a `support_id` registered before. Outputs: `logits` (1, S, S) and
`support_id` (the sha256 of the supports, masks and the repository's `model_key` parameter). Encoded support
sets are kept in the `registry_dir` parameter's folder as `<id>.npz` (temporary file + os.replace).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

ID_RE = re.compile(r"^[0-9a-f]{64}$")


class TritonPythonModel:
    """Triton's Python-backend interface: initialize(args), execute(requests), finalize()."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils  # only inside tritonserver's Python backend stub

        self.pb = pb_utils
        params = json.loads(args["model_config"]).get("parameters", {})
        get = lambda k, d="": params.get(k, {}).get("string_value", d)  # noqa: E731
        self.model_key = get("model_key")
        self.registry = get("registry_dir") or os.path.join(args["model_repository"], "registry")
        os.makedirs(self.registry, exist_ok=True)
        self.load_stages(os.path.join(args["model_repository"], args["model_version"], "stages.json"))

    def load_stages(self, path: str) -> None:
        """Each stage model's input / output names (`stages.json`, written with the repository)."""
        with open(path) as f:
            self.stages = json.load(f)

    def _run(self, model: str, outputs: list[str], **inputs: np.ndarray) -> dict[str, np.ndarray]:
        takes = set(self.stages[model]["inputs"])  # a stage's graph may not read every tensor of its spec
        req = self.pb.InferenceRequest(model_name=model, requested_output_names=outputs,
                                       inputs=[self.pb.Tensor(k, np.ascontiguousarray(v, np.float32))
                                               for k, v in inputs.items() if k in takes])
        resp = req.exec()
        if resp.has_error():
            raise self.pb.TritonModelException(f"stage {model}: {resp.error().message()}")
        return {n: self.pb.get_output_tensor_by_name(resp, n).as_numpy() for n in outputs}

    def encode_supports(self, supports: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        """supports (B, K, 3, S, S), masks (B, K, S, S) -> dino, masks, memory, obj_ptr (as Episode.encode_supports)."""
        b, k = supports.shape[:2]
        flat = supports.reshape(b * k, *supports.shape[2:])
        f = self._run("image_encoder", ["feat", "feat_s0", "feat_s1"], images=flat)
        dino = self._run("dino_features", ["dino_feat"], images=flat)["dino_feat"]
        m = self._run("memory_encoder", ["memory", "obj_ptr"], feat=f["feat"], feat_s0=f["feat_s0"],
                      feat_s1=f["feat_s1"], mask=masks.reshape(b * k, 1, *masks.shape[-2:]))
        return {"dino": dino.reshape(b, k, *dino.shape[1:]), "masks": masks,
                "memory": m["memory"].reshape(b, k, *m["memory"].shape[1:]), "obj_ptr": m["obj_ptr"].reshape(b, k, -1)}

    def segment_query(self, query: np.ndarray, sup: dict[str, np.ndarray]) -> np.ndarray:
        """query (B, 3, S, S) -> logits (B, 1, S, S) (as Episode.segment_query)."""
        b = query.shape[0]
        f = self._run("image_encoder", ["feat", "feat_s0", "feat_s1"], images=query)
        dino = self._run("dino_features", ["dino_feat"], images=query)["dino_feat"]
        p = self._run("prior", ["prior_fg", "prior_ae"], query_dino=dino, support_dino=sup["dino"],
                      support_masks=sup["masks"])
        two = lambda t: np.concatenate([t, t])  # noqa: E731
        m = self._run("memory_encoder", ["memory", "obj_ptr"], feat=two(f["feat"]), feat_s0=two(f["feat_s0"]),
                      feat_s1=two(f["feat_s1"]), mask=np.concatenate([p["prior_fg"], p["prior_ae"]]))
        qm = self._run("refinement", ["query_memory"], support_memory=sup["memory"], query_fg_memory=m["memory"][:b],
                       query_ae_memory=m["memory"][b:], support_masks=sup["masks"], prior_fg=p["prior_fg"],
                       prior_ae=p["prior_ae"])["query_memory"]
        return self._run("decoder", ["logits"], feat=f["feat"], feat_s0=f["feat_s0"], feat_s1=f["feat_s1"],
                         support_memory=sup["memory"], support_obj_ptr=sup["obj_ptr"], query_memory=qm,
                         query_obj_ptr=m["obj_ptr"][b:], support_masks=sup["masks"])["logits"]

    # ---- registry ------------------------------------------------------------------------------------------
    def support_id(self, supports: np.ndarray, masks: np.ndarray) -> str:
        h = hashlib.sha256(b"fssam-bls-support-id/1\0" + self.model_key.encode())
        for a in (np.ascontiguousarray(supports, np.float32), np.ascontiguousarray(masks > 0, np.uint8)):
            h.update(str(a.shape).encode() + a.tobytes())
        return h.hexdigest()

    def save(self, sid: str, sup: dict[str, np.ndarray]) -> None:
        path = os.path.join(self.registry, f"{sid}.npz")
        if os.path.exists(path):
            return
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **sup)
        os.replace(tmp, path)

    def load(self, sid: str) -> dict[str, np.ndarray]:
        path = os.path.join(self.registry, f"{sid}.npz")
        if not ID_RE.match(sid) or not os.path.exists(path):
            raise ValueError(f"support_id {sid[:80]!r}: unknown support set (not in {self.registry}); send supports")
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def execute(self, requests):
        out = []
        for request in requests:
            try:
                get = lambda n: self.pb.get_input_tensor_by_name(request, n)  # noqa: B023, E731
                query = get("query").as_numpy()[None]  # (1, 3, S, S)
                if get("supports") is not None:
                    supports, masks = get("supports").as_numpy()[None], get("support_masks").as_numpy()[None]
                    sid = self.support_id(supports, masks)
                    sup = self.encode_supports(supports, masks)
                    self.save(sid, sup)
                else:
                    sid = get("support_id").as_numpy().ravel()[0].decode()
                    sup = self.load(sid)
                logits = self.segment_query(query, sup)[0]
                out.append(self.pb.InferenceResponse(output_tensors=[
                    self.pb.Tensor("logits", logits.astype(np.float32)),
                    self.pb.Tensor("support_id", np.array([sid.encode()], dtype=object))]))
            except Exception as exc:  # noqa: BLE001 - one request's error is its own response
                out.append(self.pb.InferenceResponse(error=self.pb.TritonError(str(exc))))
        return out

    def finalize(self):
        pass
