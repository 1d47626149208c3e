"""The one manifest of every artifact folder (ONNX graphs, AOTInductor packages, OpenVINO IR, TensorRT engines).

`Manifest.read(folder, fmt, rebuild=...)` reads the folder's JSON once (format, config, stages) and is
handed to the runners, which ask it for their stage's file (`artifact`: listed, present, unchanged by
sha256). Every refusal is an `EngineError` naming the file and ending in the command that rebuilds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fssam_deploy.errors import ConfigError, EngineError
from fssam_deploy.model.checkpoint import file_sha256
from fssam_deploy.model.config import FSSAMConfig

MANIFEST = "manifest.json"
FORMAT_PREFIX = "fssam-"  # every manifest this toolkit writes has a format "fssam-<kind>/<version>"


def config_diff(built: dict, wanted: dict) -> dict:
    """{field: (built value, wanted value)} for every config field that differs (missing fields count)."""
    return {k: (built.get(k), wanted.get(k)) for k in sorted(set(built) | set(wanted)) if built.get(k) != wanted.get(k)}


def weights_id(checkpoint=None, seed: int = 0) -> str:
    """'sha256:<hex>' of the checkpoint file's content, or 'random:<seed>' for random weights."""
    return f"sha256:{file_sha256(checkpoint)}" if checkpoint else f"random:{seed}"


def folder_manifest(folder: str | Path | None) -> dict | None:
    """An artifact folder's manifest JSON (`manifest.json`, or TensorRT's `engines.json`) when it names a
    `format`, else None; unchecked (the backend's reader checks it)."""
    if folder is None:
        return None
    for name in (MANIFEST, "engines.json"):
        try:
            data = json.loads((Path(folder) / name).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("format"), str):
            return data
    return None


def folder_format(folder: str | Path | None) -> str | None:
    """The `format` of an artifact folder's manifest, else None."""
    data = folder_manifest(folder)
    return None if data is None else data["format"]


def read_json(path: Path, what: str, rebuild: str) -> dict:
    """A JSON object from `path`, or an EngineError naming it (absent, unreadable, not an object)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{path}: no {what}; {rebuild}") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON and Unicode decode errors
        raise EngineError(f"{path}: unreadable {what} ({type(exc).__name__}: {str(exc)[:200]}); {rebuild}") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path}: {what} is not a JSON object; {rebuild}")
    return data


@dataclass
class Manifest:
    """A folder's manifest: `data` is the JSON; `folder`, `path`; `rebuild` ends every error."""

    folder: Path
    path: Path
    data: dict
    rebuild: str

    @classmethod
    def read(cls, folder: str | Path, fmt: str, rebuild: str, filename: str = MANIFEST,
             what: str = "artifact folder", missing: str | None = None) -> Manifest:
        """Read and check `folder/filename`: present, JSON, format `fmt`, with `config` and `stages`."""
        folder = Path(folder)
        path = folder / filename
        if not folder.is_dir():
            raise EngineError(f"{folder}: not a folder; {rebuild}")
        if not path.is_file():
            raise EngineError(f"{path}: {missing or f'no manifest, not an {what}'}; {rebuild}")
        data = read_json(path, "manifest", rebuild)
        if data.get("format") != fmt:
            raise EngineError(f"{path}: format {data.get('format')!r}, expected {fmt!r} (not an {what}); {rebuild}")
        for key, kind in (("config", dict), ("stages", dict)):
            if not isinstance(data.get(key), kind):
                raise EngineError(f"{path}: manifest has no valid {key!r}; {rebuild}")
        m = cls(folder, path, data, rebuild)
        m.config  # noqa: B018  (validates the recorded config)
        return m

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    def __contains__(self, key) -> bool:
        return key in self.data

    def items(self):
        return self.data.items()

    def keys(self):
        return self.data.keys()

    @property
    def config(self) -> FSSAMConfig:
        try:
            return FSSAMConfig.from_dict(self.data["config"])
        except (ConfigError, TypeError, ValueError, AttributeError) as exc:
            raise EngineError(f"{self.path}: recorded config is invalid ({exc}); {self.rebuild}") from None

    @property
    def precision(self) -> str:
        return self.data.get("precision", "fp32")

    def check_config(self, expect: FSSAMConfig | None, what: str = "artifacts") -> None:
        """Refuse a folder built for another config than `expect` (None: anything goes)."""
        if expect is not None and self.data["config"] != expect.to_dict():
            diff = config_diff(self.data["config"], expect.to_dict())
            raise EngineError(f"{self.path}: {what} built for another config (built vs requested: {diff}); "
                              f"{self.rebuild} for this config")

    def check_stages(self, required) -> None:
        missing = sorted(set(required) - set(self.data["stages"]))
        if missing:
            raise EngineError(f"{self.path}: no {', '.join(repr(s) for s in missing)} stage (built: "
                              f"{sorted(self.data['stages'])}); an episode needs every stage: {self.rebuild}")

    def files(self, stage: str) -> list[str]:
        """Every file the manifest lists for `stage` (its main file, then any external data)."""
        entry = self.data["stages"][stage]
        return [entry["file"], *entry.get("data_files", {})]

    def artifact(self, stage: str, kind: str = "file") -> Path:
        """The path of `stage`'s `kind` (graph, package, engine), after checking that the manifest lists it and
        that it and its data files are present and unchanged (sha256)."""
        stages = self.data["stages"]
        if stage not in stages:
            raise EngineError(f"{self.folder}: no {kind} for stage {stage!r} (built: {sorted(stages)}); "
                              f"{self.rebuild}")
        entry = stages[stage]
        if not isinstance(entry, dict) or "file" not in entry or "sha256" not in entry:
            raise EngineError(f"{self.path}: entry of stage {stage!r} has no file/sha256; {self.rebuild}")
        hashes = {entry["file"]: entry["sha256"], **entry.get("data_files", {})}
        for name, digest in hashes.items():
            path = self.folder / name
            if not path.is_file():
                raise EngineError(f"{path}: {kind} of stage {stage!r} is missing; {self.rebuild}")
            if file_sha256(path) != digest:
                raise EngineError(f"{path}: {kind} of stage {stage!r} does not match the manifest's sha256 "
                                  f"(its content was modified or replaced after the build); {self.rebuild}")
        return self.folder / entry["file"]

    def listed_files(self) -> set[str]:
        """Every file name the manifest accounts for (itself included)."""
        names = {self.path.name, *self.data.get("extra_files", [])}
        for stage in self.data["stages"]:
            names.update(self.files(stage))
        return names

    def unlisted_files(self) -> list[str]:
        """Files in the folder the manifest does not list (there should be none)."""
        present = {p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file()}
        return sorted(present - self.listed_files())
