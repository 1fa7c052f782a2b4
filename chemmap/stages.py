"""Stage outputs keyed by what made them.

Every stage writes under ``workdir/<stage>/<key>/`` where ``key`` hashes the stage's
resolved config section and the keys of its inputs. The stage writes its outputs, then
the resolved config, then ``_COMPLETE.json`` last (atomically): a folder without that
marker is unfinished, whatever else it holds. A rerun with the same key finds the marker
and does nothing; an interrupted run finds the folder unfinished and resumes or rebuilds
it; the next stage computes its input's key and finds the folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chemmap.files import write_json_atomic, write_text_atomic

# Bump when a stage's output format changes, so old outputs are not mistaken for new ones.
FORMAT_VERSION = 1
MARKER = "_COMPLETE.json"


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short sha256 of a JSON-able object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class StageDir:
    """One stage output folder."""

    name: str
    key: str
    path: Path
    config: Mapping[str, Any]
    inputs: tuple[str, ...]

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def complete(self) -> bool:
        return self.marker.is_file()

    def summary(self) -> dict[str, Any]:
        """What the stage recorded on completion (raises if it is not complete)."""
        if not self.complete:
            raise FileNotFoundError(f"stage {self.name} at {self.path} has not completed")
        return json.loads(self.marker.read_text())

    def begin(self, *, fresh: bool = False) -> Path:
        """Create the folder for writing; ``fresh`` removes leftovers of an interrupted run first."""
        if self.complete:
            raise RuntimeError(f"stage {self.name} at {self.path} is already complete")
        if fresh and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def clear(self) -> None:
        """Remove the folder, finished or not (``chemmap run --force``): the marker first, so
        that an interrupted removal leaves an unfinished folder, never a finished-looking one."""
        self.marker.unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)

    def finish(self, summary: Mapping[str, Any] | None = None, resolved_config: str | None = None) -> None:
        """Write the resolved config and then the completion marker, last."""
        cfg_text = resolved_config if resolved_config is not None else yaml.safe_dump(dict(self.config))
        write_text_atomic(self.path / "config.yaml", cfg_text)
        record = {
            "stage": self.name,
            "key": self.key,
            "inputs": list(self.inputs),
            "config": dict(self.config),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "format_version": FORMAT_VERSION,
            **(dict(summary) if summary else {}),
        }
        write_json_atomic(self.marker, record)


def stage_dir(workdir: Path, name: str, config: Mapping[str, Any], inputs: Sequence[str] = ()) -> StageDir:
    """The output folder of stage ``name`` for this config section and these input keys."""
    key = stable_hash({"stage": name, "v": FORMAT_VERSION, "config": config, "inputs": sorted(inputs)})
    return StageDir(name=name, key=key, path=Path(workdir) / name / key, config=config, inputs=tuple(inputs))


def file_entries(paths: Sequence[Path], root: Path | None = None) -> list[list[Any]]:
    """``[name, size, mtime_ns]`` of input files on disk, sorted: cheap (no reading), and it
    changes whenever a scanner rewrites a file. Names are relative to ``root`` when given."""
    entries: list[list[Any]] = []
    for p in sorted(Path(x) for x in paths):
        st = p.stat()
        name = str(p.relative_to(root)) if root else str(p)
        entries.append([name, st.st_size, st.st_mtime_ns])
    return entries


def files_key(paths: Sequence[Path], root: Path | None = None) -> str:
    """A key for input files on disk: a hash of their :func:`file_entries`."""
    return stable_hash(file_entries(paths, root))
