"""A small client of `fssam serve` on `tritonclient` (HTTP or gRPC, the KServe v2 protocol).

```python
from fssam_deploy.client import FSSAMClient

with FSSAMClient("127.0.0.1:8000") as c:
    sid = c.register(["s.png"], ["s_mask.png"])          # files, bytes or (H, W, 3) uint8 arrays
    mask, logits = c.segment("q.jpg", support_id=sid)   # (H, W) bool, (H, W) float32 at q.jpg's size
    mask, logits = c.segment("q.jpg", supports=["s.png"], masks=["s_mask.png"])  # uncached
```

Files and bytes travel encoded (`query`, `supports`, `support_masks`); numpy arrays travel raw
(`query_raw`, ...). A server-side error comes back as the project's typed error (InputError for a bad
request) with the server's message; a server that cannot be reached is an EngineError naming the URL.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from fssam_deploy.errors import BackendUnavailableError, EngineError, InputError

SEGMENT, REGISTER, SEGMENT_CACHED = "fssam_segment", "fssam_register", "fssam_segment_cached"
_ERROR_LINE = re.compile(r"fssam_deploy\.errors\.(\w+): (.*)")


def _protocol_module(protocol: str):
    try:
        if protocol == "http":
            import tritonclient.http as mod
        elif protocol == "grpc":
            import tritonclient.grpc as mod
        else:
            raise InputError(f"--protocol {protocol!r}: choose http or grpc")
    except ImportError as exc:
        raise BackendUnavailableError(f"the FSSAM client needs tritonclient ({exc}): pip install "
                                      "'fssam-deploy[serve]'") from None
    return mod


def server_error(exc: Exception, url: str) -> Exception:
    """A tritonclient exception -> the project's error: the server's own message when it sent one."""
    from fssam_deploy import errors

    text = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    text = text or str(exc)
    found = _ERROR_LINE.findall(text)
    if found:
        name, msg = found[-1]
        cls = getattr(errors, name, InputError)
        return cls(msg) if isinstance(cls, type) and issubclass(cls, errors.FSSAMError) else InputError(msg)
    if any(s in text for s in ("onnect", "refused", "unavailable", "UNAVAILABLE", "timed out")):
        return EngineError(f"{url}: cannot reach the FSSAM server ({text.strip()[:300]}); is `fssam serve` running "
                           "there?")
    return InputError(f"{url}: the server refused the request: {text.strip()[:1000]}")


def _encoded(item) -> bytes | None:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        p = Path(item)
        try:
            return p.read_bytes()
        except FileNotFoundError:
            raise InputError(f"{p}: file not found") from None
        except OSError as exc:
            raise InputError(f"{p}: cannot read the file ({exc.strerror or exc})") from None
    return None


class FSSAMClient:
    """`register`, `segment` against one server. `url`: host:port of its HTTP (or gRPC) endpoint."""

    def __init__(self, url: str, protocol: str = "http", timeout_s: float = 120.0):
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self._mod = _protocol_module(protocol)
        kw = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        self._client = self._mod.InferenceServerClient(url, **kw)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FSSAMClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_ready(self) -> bool:
        """The server is up and the three models are loaded."""
        try:
            return bool(self._client.is_server_ready()) and all(
                self._client.is_model_ready(m) for m in (SEGMENT, REGISTER, SEGMENT_CACHED))
        except Exception:  # noqa: BLE001 - any transport error means: not ready
            return False

    # ---- request building ----------------------------------------------------------------------------------
    def _input(self, name: str, arr: np.ndarray):
        dtype = "BYTES" if arr.dtype == object else {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}.get(
            arr.dtype, str(arr.dtype).upper())
        inp = self._mod.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        return inp

    def _images(self, name: str, items: list) -> list:
        """Encoded files/bytes -> one BYTES input (1, K); arrays -> one raw input (1, K, ...)."""
        enc = [_encoded(x) for x in items]
        if all(e is not None for e in enc):
            return [self._input(name, np.array([enc], dtype=object))]
        if any(e is not None for e in enc):
            raise InputError(f"{name}: mix of files/bytes and arrays; give all as files or all as uint8 arrays")
        arrs = [np.asarray(x) for x in items]
        if name == "support_masks":
            arrs = [(a > 0).astype(np.uint8) for a in arrs]
        if len({a.shape for a in arrs}) > 1:
            raise InputError(f"{name}: raw arrays of different shapes {[a.shape for a in arrs]}; send files instead")
        return [self._input(f"{name}_raw", np.stack(arrs)[None])]  # (1, K, H, W[, 3])

    def _query(self, query) -> list:
        enc = _encoded(query)
        if enc is not None:
            return [self._input("query", np.array([[enc]], dtype=object))]
        return [self._input("query_raw", np.asarray(query)[None])]

    def _supports(self, supports: list, masks: list) -> list:
        if not supports:
            raise InputError("at least one support image is needed")
        return self._images("supports", list(supports)) + self._images("support_masks", list(masks))

    def infer(self, model: str, inputs: list, outputs: list[str]) -> dict[str, np.ndarray]:
        """One raw request: inputs -> the named outputs as arrays (errors as the project's errors)."""
        req_out = [self._mod.InferRequestedOutput(n) for n in outputs]
        try:
            res = self._client.infer(model, inputs, outputs=req_out,
                                     **({"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}))
        except Exception as exc:  # noqa: BLE001 - tritonclient raises InferenceServerException and transport errors
            raise server_error(exc, self.url) from None
        out = {n: res.as_numpy(n) for n in outputs}
        if "error" in out and out["error"] is not None:
            msg = out["error"].ravel()[0]
            msg = msg.decode() if isinstance(msg, bytes) else str(msg)
            if msg:
                raise server_error(Exception(msg), self.url) if _ERROR_LINE.search(msg) else InputError(msg)
        return out

    # ---- the API -------------------------------------------------------------------------------------------
    def register(self, supports: list, masks: list) -> str:
        """Encode a support set on the server once; returns its `support_id` (the same on every replica)."""
        out = self.infer(REGISTER, self._supports(supports, masks), ["support_id", "error"])
        sid = out["support_id"].ravel()[0]
        return sid.decode() if isinstance(sid, bytes) else str(sid)

    def segment(self, query, support_id: str | None = None, supports: list | None = None,
                masks: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One query (file, bytes or (H, W, 3) uint8) -> mask (H, W) bool and logits (H, W) float32 at its size,
        against a registered `support_id` or against `supports` / `masks` sent along."""
        if (support_id is None) == (supports is None):
            raise InputError("give either support_id or supports and masks")
        if support_id is not None:
            sid = self._input("support_id", np.array([[support_id.encode()]], dtype=object))
            out = self.infer(SEGMENT_CACHED, self._query(query) + [sid], ["mask", "logits", "error"])
        else:
            out = self.infer(SEGMENT, self._query(query) + self._supports(supports, masks or []),
                             ["mask", "logits", "error"])
        return out["mask"][0] > 0, out["logits"][0].astype(np.float32)

    def stats(self, model: str) -> dict:
        """Triton's statistics of `model` (`/v2/models/<model>/stats`)."""
        try:
            return self._client.get_inference_statistics(model, **({"as_json": True} if self.protocol == "grpc"
                                                                    else {}))
        except Exception as exc:  # noqa: BLE001
            raise server_error(exc, self.url) from None
