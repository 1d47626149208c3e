"""The support registry: content-hash ids, LRU under a byte budget, atomic files, reload from the folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fssam_deploy.errors import ConfigError, InputError
from fssam_deploy.serve.store import SupportStore, check_id, model_key, support_id

KEY = model_key("random:0", '{"image_size": 256}', "fp32")


def _set(seed=0, n=1):
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(n)]
    masks = [(rng.random((20, 30)) > 0.5).astype(np.float32) for _ in range(n)]
    return imgs, masks


def _feats(nbytes=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"memory": torch.randn(1, 1, nbytes // 8, generator=g),
            "obj_ptr": torch.randn(1, 1, nbytes // 8, generator=g)}


def test_support_id_is_content_hash():
    imgs, masks = _set()
    sid = support_id(imgs, masks, KEY)
    assert check_id(sid) == sid
    assert support_id([i.copy() for i in imgs], [m * 255 for m in masks], KEY) == sid  # 255 masks: same set
    other = [imgs[0].copy()]
    other[0][0, 0, 0] ^= 1
    assert support_id(other, masks, KEY) != sid
    flipped = [1 - masks[0]]
    assert support_id(imgs, flipped, KEY) != sid
    assert support_id(imgs, masks, model_key("random:1", '{"image_size": 256}', "fp32")) != sid
    assert support_id(imgs, masks, model_key("random:0", '{"image_size": 512}', "fp32")) != sid
    assert support_id(imgs, masks, model_key("random:0", '{"image_size": 256}', "bf16")) != sid
    # same pixels, another shape: another id
    assert support_id([imgs[0].reshape(30, 20, 3)], [masks[0].reshape(30, 20)], KEY) != sid


def test_lru_under_budget_and_reload_from_folder(tmp_path):
    store = SupportStore(KEY, budget_bytes=2 * 4096 + 100, folder=tmp_path)
    ids = [support_id(*_set(s), KEY) for s in range(3)]
    for s, sid in enumerate(ids):
        store.put(sid, _feats(seed=s))
    assert store.stats()["in_memory"] == 2 and store.stats()["bytes"] <= store.budget
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.safetensors" for i in ids)  # no temp files
    got = store.get(ids[0])  # evicted from memory: read back from the folder
    assert store.disk_reads == 1
    assert torch.equal(got["memory"], _feats(seed=0)["memory"])
    fresh = SupportStore(KEY, budget_bytes=1 << 20, folder=tmp_path)  # a restart, or a second replica
    assert fresh.warm() == 3
    for s, sid in enumerate(ids):
        assert torch.equal(fresh.get(sid)["obj_ptr"], _feats(seed=s)["obj_ptr"])


def test_refusals(tmp_path):
    store = SupportStore(KEY, folder=tmp_path)
    sid = support_id(*_set(), KEY)
    with pytest.raises(InputError, match=f"support_id {sid}: unknown support set .*registry folder"):
        store.get(sid)
    with pytest.raises(InputError, match="not a support id"):
        store.get("../../etc/passwd")
    store.put(sid, _feats())
    other = SupportStore(model_key("random:1", "{}", "fp32"), folder=tmp_path)
    with pytest.raises(InputError, match="encoded by another model"):
        other.get(sid)
    (tmp_path / f"{'a' * 64}.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="unreadable"):
        store.get("a" * 64)
    mem_only = SupportStore(KEY, budget_bytes=0)
    mem_only.put(sid, _feats())  # over the budget and no folder: gone
    with pytest.raises(InputError, match="keeps no --registry folder"):
        mem_only.get(sid)
    with pytest.raises(ConfigError, match="budget"):
        SupportStore(KEY, budget_bytes=-1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create the folder"):
        SupportStore(KEY, folder=blocker / "sub")
