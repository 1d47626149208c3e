"""The support-set registry: encoded support sets by content hash, in memory (LRU, byte budget) and on disk.

`support_id(...)` is a sha256 over the decoded support images and masks (bytes and shapes), the model's
weights id (`manifest.weights_id`: checkpoint sha256 or `random:<seed>`), `cfg.to_json()` and the backend's
precision: any replica of the same model computes the same id for the same supports.

`SupportStore` keeps encoded support sets (a dict of tensors: the fields of the episode's support
dataclass) in memory under `budget_bytes`, least recently used first out, and, with a `folder`, writes
each one at registration as `<id>.safetensors` (temporary file + `os.replace`: a reader never sees half a
file). A miss in memory reads the folder, so a restarted server, or a second replica on the same folder,
answers every id registered before. Files carry the weights id and config they were encoded with; a
file of another model is refused, never used.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from fssam_deploy.errors import ConfigError, InputError

FORMAT = "fssam-support/1"
SUFFIX = ".safetensors"
ID_RE = re.compile(r"^[0-9a-f]{64}$")


def support_id(images: list[np.ndarray], masks: list[np.ndarray], model_key: str) -> str:
    """sha256 hex of K support images (H, W, 3) uint8, their masks (H, W) {0, 1} and `model_key`
    (`model_key(weights_id, cfg, precision)`). Masks are hashed binarized, so 255 and 1 give one id."""
    h = hashlib.sha256(b"fssam-support-id/1\0")
    h.update(model_key.encode())
    h.update(f"\0K={len(images)}\0".encode())
    for img, m in zip(images, masks):
        img = np.ascontiguousarray(img, dtype=np.uint8)
        mb = np.ascontiguousarray(np.asarray(m) > 0, dtype=np.uint8)
        h.update(f"img{img.shape}\0".encode())
        h.update(img.tobytes())
        h.update(f"mask{mb.shape}\0".encode())
        h.update(mb.tobytes())
    return h.hexdigest()


def model_key(weights_id: str, cfg_json: str, precision: str) -> str:
    """What besides the pixels decides the encoded features: weights, config, precision."""
    return f"weights={weights_id}\0config={cfg_json}\0precision={precision}"


def check_id(sid: str) -> str:
    """A well-formed support id (64 lowercase hex digits), or an InputError saying what it got."""
    if not isinstance(sid, str) or not ID_RE.match(sid):
        shown = sid if isinstance(sid, str) and len(sid) <= 80 else f"{str(sid)[:80]}..."
        raise InputError(f"support_id {shown!r}: not a support id (64 hex digits, as fssam_register returns)")
    return sid


def tensors_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class SupportStore:
    """Encoded support sets by id: `put(id, tensors)`, `get(id) -> tensors`, thread-safe.

    `budget_bytes`: memory kept (least recently used out first; a set larger than the budget is still
    kept on disk). `folder`: the registry folder (None: memory only, an evicted id is gone). `model_key`:
    written into every file and checked on reading, so a folder shared by replicas of another model never
    yields wrong features.
    """

    def __init__(self, model_key: str, budget_bytes: int = 1 << 30, folder: str | os.PathLike | None = None):
        if budget_bytes < 0:
            raise ConfigError(f"registry memory budget {budget_bytes}: must be >= 0 bytes")
        self.model_key = model_key
        self.budget = budget_bytes
        self.folder = Path(folder) if folder is not None else None
        self._mem: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self.hits = self.misses = self.disk_reads = 0
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                why = exc.strerror or exc
                raise ConfigError(f"--registry {self.folder}: cannot create the folder ({why})") from None
            if not os.access(self.folder, os.W_OK):
                raise ConfigError(f"--registry {self.folder}: folder is not writable; give a folder this user can "
                                  "write")

    # ---- disk -------------------------------------------------------------------------------------------
    def path(self, sid: str) -> Path:
        return self.folder / f"{sid}{SUFFIX}"

    def _write(self, sid: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tmp = self.folder / f".{sid}.{secrets.token_hex(4)}.tmp"
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"format": FORMAT, "support_id": sid, "model_key": self.model_key})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path(sid))
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self, sid: str) -> dict[str, torch.Tensor] | None:
        from safetensors import safe_open

        p = self.path(sid)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types on a damaged file
            raise InputError(f"support_id {sid}: registry file {p} is unreadable ({type(exc).__name__}: {exc}); "
                             "register the support set again") from None
        if meta.get("format") != FORMAT or meta.get("support_id") != sid:
            raise InputError(f"support_id {sid}: {p} is not a support set file of this format ({FORMAT}); "
                             "register the support set again")
        if meta.get("model_key") != self.model_key:
            raise InputError(f"support_id {sid}: {p} was encoded by another model ({meta.get('model_key')!r}, "
                             f"this server: {self.model_key!r}); register it on this server")
        self.disk_reads += 1
        return tensors

    def ids_on_disk(self) -> list[str]:
        """Ids in the registry folder, newest first."""
        if self.folder is None:
            return []
        files = [p for p in self.folder.glob(f"*{SUFFIX}") if ID_RE.match(p.stem)]
        return [p.stem for p in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)]

    def warm(self) -> int:
        """Load the newest sets of the folder into memory up to the budget; returns how many."""
        n = 0
        for sid in self.ids_on_disk():
            with self._lock:
                if sid in self._mem:
                    continue
                try:
                    tensors = self._read(sid)
                except InputError:
                    continue  # another model's or a damaged file: refused when asked for, not at start
                if tensors is None or self._bytes + tensors_nbytes(tensors) > self.budget:
                    break
                self._remember(sid, tensors)
                n += 1
        return n

    # ---- memory -----------------------------------------------------------------------------------------
    def _remember(self, sid: str, tensors: dict[str, torch.Tensor]) -> None:
        if sid in self._mem:
            self._mem.move_to_end(sid)
            return
        self._mem[sid] = tensors
        self._bytes += tensors_nbytes(tensors)
        while self._bytes > self.budget and len(self._mem) > 1:
            _, old = self._mem.popitem(last=False)
            self._bytes -= tensors_nbytes(old)
        if self._bytes > self.budget:  # a single set over the whole budget: on disk only
            _, old = self._mem.popitem(last=False)
            self._bytes -= tensors_nbytes(old)

    def __contains__(self, sid: str) -> bool:
        with self._lock:
            return sid in self._mem or (self.folder is not None and self.path(sid).is_file())

    def put(self, sid: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep an encoded set; with a folder it is on disk (atomically) before this returns."""
        check_id(sid)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with self._lock:
            if self.folder is not None and not self.path(sid).is_file():
                self._write(sid, tensors)
            self._remember(sid, tensors)

    def get(self, sid: str) -> dict[str, torch.Tensor]:
        """The encoded set of `sid` (memory, else the folder), or an InputError naming the id."""
        check_id(sid)
        with self._lock:
            if sid in self._mem:
                self.hits += 1
                self._mem.move_to_end(sid)
                return self._mem[sid]
            self.misses += 1
            tensors = self._read(sid) if self.folder is not None else None
            if tensors is None:
                where = (f"not in memory nor in the registry folder {self.folder}" if self.folder is not None
                         else "not in memory (this server keeps no --registry folder, so evicted and pre-restart "
                              "ids are gone)")
                raise InputError(f"support_id {sid}: unknown support set ({where}); register it with "
                                 "fssam_register (`fssam client register`) first")
            self._remember(sid, tensors)
            return tensors

    def flush(self) -> None:
        """Every `put` is on disk when it returns; this waits for one in progress and syncs the folder."""
        with self._lock:
            if self.folder is not None:
                fd = os.open(self.folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def stats(self) -> dict:
        with self._lock:
            return {"in_memory": len(self._mem), "bytes": self._bytes, "budget_bytes": self.budget,
                    "hits": self.hits, "misses": self.misses, "disk_reads": self.disk_reads,
                    "folder": str(self.folder) if self.folder else None}
