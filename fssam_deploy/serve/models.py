"""The three served models over one episode (any registry backend) and one support store.

- `fssam_segment`: query image(s) + support images + masks -> mask and logits at the query's size;
- `fssam_register`: support images + masks -> `support_id` (the set encoded once and kept in the store);
- `fssam_segment_cached`: query image(s) + `support_id` -> mask and logits.

Triton's dynamic batcher hands each callable a list of requests. Every request is decoded and checked
on its own; the support sides of a batch run as one `encode_supports` call per shot count, and the query
sides (against the same or different support sets) as one `segment_query` call per shot count, the
support features concatenated along the batch axis.

Errors: PyTriton fails a whole batch when its callable raises, so a request that fails its checks does
not raise while another request of its batch is good: its response then holds a 1x1 zero mask and its
message in the `error` output (the client raises it as an InputError). Not an empty (b, 0, 0) mask: PyTriton's
shared-memory tensor store cannot hold zero-size arrays (`memoryview.cast` refuses zeros in the shape), and
that failed the whole batch, the good requests with it. When every request of a batch
fails (a lone request, the usual case), the callable raises and Triton returns an error response with
every message.
"""

from __future__ import annotations

import dataclasses
import threading
import typing
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch

from fssam_deploy.episode import SupportSession
from fssam_deploy.errors import FSSAMError, InputError
from fssam_deploy.serve.codec import (
    Limits,
    check_size,
    decode_queries,
    decode_support_id,
    decode_supports,
    queries_to_tensor,
    supports_to_tensors,
    to_original,
)
from fssam_deploy.serve.store import SupportStore, model_key, support_id

SEGMENT, REGISTER, SEGMENT_CACHED = "fssam_segment", "fssam_register", "fssam_segment_cached"
MODEL_NAMES = (SEGMENT, REGISTER, SEGMENT_CACHED)


def support_class(episode) -> type:
    """The dataclass `episode.encode_supports` returns (read from its annotation, so field changes follow)."""
    hints = typing.get_type_hints(type(episode).encode_supports)
    cls = hints.get("return")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{type(episode).__name__}.encode_supports must be annotated to return a dataclass")
    return cls


def features_to_dict(feat) -> dict[str, torch.Tensor]:
    return {f.name: getattr(feat, f.name) for f in dataclasses.fields(feat)}


def _split(feat, n: int) -> list[dict[str, torch.Tensor]]:
    """Batched support features (n, ...) -> n dicts of (1, ...) tensors, contiguous: the layout the store keeps,
    so that fssam_segment and fssam_segment_cached feed the query side alike (a compiled stage, which guards on
    strides, then compiles once for both)."""
    d = features_to_dict(feat)
    return [{k: v[i : i + 1].contiguous() for k, v in d.items()} for i in range(n)]


def _signature(d: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(d.items()))


class FSSAMService:
    """The inference callables of the three models, over `episode` and `store`.

    `weights_id` / `precision` enter every support id (with `episode.cfg.to_json()`). Model calls are
    serialised by a lock (instances overlap decoding and encoding of responses with compute).
    """

    def __init__(self, episode, weights_id: str, precision: str = "fp32", store: SupportStore | None = None,
                 limits: Limits | None = None, budget_bytes: int = 1 << 30, registry=None):
        self.episode = episode
        self.cfg = episode.cfg
        self.key = model_key(weights_id, self.cfg.to_json(), precision)
        self.store = store if store is not None else SupportStore(self.key, budget_bytes, registry)
        self.limits = limits or Limits()
        self.feature_cls = support_class(episode)
        self.shots = episode.fixed_shots()  # None: any K
        self.lock = threading.Lock()
        self.batch_sizes: dict[str, list[int]] = defaultdict(list)  # requests per call, per model
        self.partial_failures: dict[str, int] = defaultdict(int)  # calls where some, not all, requests failed

    # ---- model work (batched) ------------------------------------------------------------------------------
    def _encode(self, sets: list[tuple[list, list]]) -> list[dict[str, torch.Tensor]]:
        """Support sets (images, masks) -> their features, one `with_supports` call per shot count."""
        out: list = [None] * len(sets)
        by_k: dict[int, list[int]] = defaultdict(list)
        for i, (imgs, _) in enumerate(sets):
            by_k[len(imgs)].append(i)
        size = self.cfg.image_size
        for idx in by_k.values():
            pairs = [supports_to_tensors(*sets[i], size) for i in idx]
            sup = torch.cat([p[0] for p in pairs])  # (n, K, 3, S, S)
            masks = torch.cat([p[1] for p in pairs])  # (n, K, S, S)
            with self.lock, torch.inference_mode():
                session = self.episode.with_supports(sup, masks)
            for i, d in zip(idx, _split(session.support, len(idx))):
                out[i] = d
        return out

    def _segment(self, jobs: list[tuple[list, dict]]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """(query images, support features) per request -> per request, (mask, logits) per query.

        Requests whose features have the same shapes run as one batch: the features repeated per query
        and concatenated along the batch axis."""
        out: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, feats) in enumerate(jobs):
            groups[_signature(feats)].append(i)
        size = self.cfg.image_size
        for idx in groups.values():
            x = torch.cat([queries_to_tensor(jobs[i][0], size) for i in idx])  # (N, 3, S, S)
            counts = [len(jobs[i][0]) for i in idx]
            names = jobs[idx[0]][1].keys()
            feats = {k: torch.cat([jobs[i][1][k].expand(n, *jobs[i][1][k].shape[1:]) for i, n in zip(idx, counts)])
                     for k in names}
            sup = self.feature_cls(**{k: v.to(self.episode.device) for k, v in feats.items()})
            with self.lock, torch.inference_mode():
                logits = SupportSession(self.episode, sup).segment(x).cpu()  # (N, 1, S, S)
            start = 0
            for i, n in zip(idx, counts):
                out[i] = [to_original(logits[start + j], jobs[i][0][j].shape[:2]) for j in range(n)]
                start += n
        return out

    def warm_up(self) -> float:
        """What one `fssam_segment` request computes (a synthetic support set at the engine's shots encoded, a
        query segmented against it, through `_encode` and `_segment`: the layouts requests get), run before the
        server listens; its seconds. Nothing is stored and no request is counted. A compiled backend compiles
        here (torch-compile-bf16 on a 2-core CPU, paper config: about a minute with a warm Inductor cache),
        an engine allocates its buffers: paid at start, not by the first client, who would wait behind it (and
        time out at the client's 120 s)."""
        import time

        from fssam_deploy.synthetic import synthetic_episode

        t0 = time.perf_counter()
        query, _, sup, masks = synthetic_episode(self.cfg.image_size, self.shots or self.cfg.shots, seed=0)
        feats = self._encode([(sup, [(m > 0).astype(np.float32) for m in masks])])
        self._segment([([query], feats[0])])
        return time.perf_counter() - t0

    # ---- responses -----------------------------------------------------------------------------------------
    @staticmethod
    def _fail_all(model: str, errors: dict[int, str], n: int) -> None:
        if n == 1:
            raise InputError(errors[0])
        raise InputError(f"{model}: every request of this batch failed: " +
                         " | ".join(f"request {i}: {msg}" for i, msg in sorted(errors.items())))

    @staticmethod
    def _mask_responses(requests, results, errors: dict[int, str]) -> list[dict[str, np.ndarray]]:
        resp = []
        for i, req in enumerate(requests):
            if i in errors:
                b = max(1, next(iter(req.values())).shape[0]) if len(req) else 1
                resp.append({"mask": np.zeros((b, 1, 1), np.uint8), "logits": np.zeros((b, 1, 1), np.float32),
                             "error": np.array([[errors[i].encode()]] * b, dtype=object)})
                continue
            masks, logits = zip(*results[i])
            resp.append({"mask": np.stack(masks), "logits": np.stack(logits),
                         "error": np.array([[b""]] * len(masks), dtype=object)})
        return resp

    def _decode_all(self, model: str, requests, decode: Callable) -> tuple[list, dict[int, str]]:
        ok, errors = [], {}
        for i, req in enumerate(requests):
            try:
                check_size(req, model, self.limits)
                ok.append((i, decode(req)))
            except FSSAMError as exc:
                errors[i] = str(exc)
        if errors and not ok:
            self._fail_all(model, errors, len(requests))
        if errors:
            self.partial_failures[model] += 1
        self.batch_sizes[model].append(len(requests))
        return ok, errors

    def _supports(self, req, model: str) -> tuple[list, list]:
        imgs, masks = decode_supports(req, model, self.limits)
        if self.shots is not None and len(imgs) != self.shots:
            raise InputError(f"{model}: {len(imgs)} support image(s), but this server's "
                             f"{getattr(self.episode, 'name', 'engine')} engine was built for {self.shots} shot(s): "
                             f"send {self.shots}, or serve an engine exported with --shots {len(imgs)}")
        return imgs, masks

    def _id_of(self, imgs, masks) -> str:
        return support_id(imgs, masks, self.key)

    # ---- the three callables (lists of PyTriton requests -> list of response dicts) ------------------------
    def infer_register(self, requests) -> list[dict[str, np.ndarray]]:
        ok, errors = self._decode_all(REGISTER, requests, lambda r: self._supports(r, REGISTER))
        ids = {i: self._id_of(*sets) for i, sets in ok}
        todo = [(i, sets) for i, sets in ok if ids[i] not in self.store]
        for (i, _), feats in zip(todo, self._encode([s for _, s in todo])):
            self.store.put(ids[i], feats)
        return [{"support_id": np.array([[(b"" if i in errors else ids[i].encode())]], dtype=object),
                 "error": np.array([[errors.get(i, "").encode()]], dtype=object)} for i in range(len(requests))]

    def infer_segment(self, requests) -> list[dict[str, np.ndarray]]:
        def decode(r):
            return decode_queries(r, SEGMENT, self.limits), self._supports(r, SEGMENT)

        ok, errors = self._decode_all(SEGMENT, requests, decode)
        feats = self._encode([sets for _, (_, sets) in ok])
        results = self._segment([(q, f) for (_, (q, _)), f in zip(ok, feats)])
        return self._mask_responses(requests, dict(zip([i for i, _ in ok], results)), errors)

    def infer_segment_cached(self, requests) -> list[dict[str, np.ndarray]]:
        def decode(r):
            sid = decode_support_id(r, SEGMENT_CACHED)
            queries = decode_queries(r, SEGMENT_CACHED, self.limits)
            return queries, self.store.get(sid)

        ok, errors = self._decode_all(SEGMENT_CACHED, requests, decode)
        results = self._segment([job for _, job in ok])
        return self._mask_responses(requests, dict(zip([i for i, _ in ok], results)), errors)


def bind_models(triton, service: FSSAMService, instances: int = 1, max_batch: int = 8,
                queue_delay_us: int = 2000) -> None:
    """Bind the three models on a `pytriton.triton.Triton`, dynamic batching on (`max_batch` requests,
    `queue_delay_us` of waiting for more), `instances` callables each."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    b, u8 = np.bytes_, np.uint8
    query = [Tensor(name="query", dtype=b, shape=(-1,), optional=True),
             Tensor(name="query_raw", dtype=u8, shape=(-1, -1, 3), optional=True)]
    supports = [Tensor(name="supports", dtype=b, shape=(-1,), optional=True),
                Tensor(name="supports_raw", dtype=u8, shape=(-1, -1, -1, 3), optional=True),
                Tensor(name="support_masks", dtype=b, shape=(-1,), optional=True),
                Tensor(name="support_masks_raw", dtype=u8, shape=(-1, -1, -1), optional=True)]
    masks = [Tensor(name="mask", dtype=u8, shape=(-1, -1)), Tensor(name="logits", dtype=np.float32, shape=(-1, -1)),
             Tensor(name="error", dtype=b, shape=(1,))]
    sid = Tensor(name="support_id", dtype=b, shape=(1,))
    config = ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us))
    specs = {SEGMENT: (service.infer_segment, query + supports, masks),
             REGISTER: (service.infer_register, supports, [sid, Tensor(name="error", dtype=b, shape=(1,))]),
             SEGMENT_CACHED: (service.infer_segment_cached, query + [sid], masks)}
    for name, (fn, inputs, outputs) in specs.items():
        triton.bind(model_name=name, infer_func=[fn] * max(1, instances), inputs=inputs, outputs=outputs,
                    config=config, strict=False)
