"""The one reader of a finished ``dataset.zarr``: samples, recipe, cubes, masks, truth, patch index.

Training, evaluation and the benchmarks read a dataset only through :class:`Dataset`
(see :mod:`chemmap.preprocess.dataset` for the layout). Nothing here goes back to the raw
scans: a dataset stays usable after they are archived.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chemmap.errors import InputError
from chemmap.preprocess.recipe import Recipe
from chemmap.preprocess.scan import model_input


@dataclass(frozen=True)
class SampleInfo:
    """One sample: its split, its lab values (in the dataset's target order) and its scans."""

    sample_id: str
    split: int
    targets: tuple[float, ...]
    scans: tuple[str, ...]


@dataclass(frozen=True)
class PatchIndex:
    """Core windows for patch-wise training, on the model's stride grid.

    Attributes:
        core, halo, stride: px at the input's resolution; ``halo`` >= the model's receptive
            radius and both multiples of ``stride`` when made for a model.
        windows: ``(n, 5)`` int32 rows ``(scan, y0, x0, y1, x1)``: the scan's index in
            :attr:`Dataset.scan_ids`, then a core window holding at least one sample pixel.
    """

    core: int
    halo: int
    stride: int
    windows: np.ndarray

    def of_scan(self, index: int) -> list[tuple[int, int, int, int]]:
        """The core windows ``(y0, x0, y1, x1)`` of one scan."""
        rows = self.windows[self.windows[:, 0] == index, 1:]
        return [tuple(int(v) for v in r) for r in rows]  # type: ignore[misc]


class Dataset:
    """Read-only access to a finished ``dataset.zarr``.

    Args:
        store: the ``dataset.zarr`` folder.

    Raises:
        InputError: the folder is missing or not a finished chemmap dataset.
    """

    def __init__(self, store: str | Path) -> None:
        import zarr

        self.path = Path(store)
        if not self.path.exists():
            raise InputError(f"dataset not found: {self.path}")
        self.root = zarr.open_group(str(self.path), mode="r")
        attrs = dict(self.root.attrs)
        if "recipe" not in attrs or "samples" not in attrs:
            raise InputError(f"{self.path}: not a finished chemmap dataset (no recipe in its attributes)")
        self.attrs = attrs
        self.recipe = Recipe.from_dict(attrs["recipe"])
        self.targets: list[str] = list(attrs["targets"])
        self.input_key: str = attrs.get("input_key", "")
        self.samples = {
            s["sample_id"]: SampleInfo(
                s["sample_id"], int(s["split"]), tuple(s["targets"]), tuple(s["scans"])
            )
            for s in attrs["samples"]
        }
        self.scan_table: list[dict[str, Any]] = list(attrs["scans"])
        self.scan_ids = [s["scan_id"] for s in self.scan_table]
        self._arrays: dict[str, Any] = {}

    @property
    def n_channels(self) -> int:
        return self.recipe.n_channels

    @property
    def splits(self) -> list[int]:
        return sorted({s.split for s in self.samples.values()})

    def ids(self, splits: Sequence[int]) -> list[str]:
        """Sample ids in these splits, sorted."""
        return sorted(s for s, info in self.samples.items() if info.split in splits)

    def cube(self, scan_id: str):
        """The stored cube ``(channels, lines, samples)`` (a Zarr array: slice it to read)."""
        if scan_id not in self._arrays:
            self._arrays[scan_id] = self.root[f"scans/{scan_id}/cube"]
        return self._arrays[scan_id]

    def shape(self, scan_id: str) -> tuple[int, int]:
        return tuple(self.cube(scan_id).shape[1:])  # type: ignore[return-value]

    def mask(self, scan_id: str) -> np.ndarray:
        return self.root[f"scans/{scan_id}/mask"][...]

    def brightness(self, scan_id: str) -> np.ndarray:
        """A scan's mean reflectance ``(lines, samples)`` over the mask's bands, before any transform.

        Raises:
            InputError: the dataset predates it (format 3): build it again.
        """
        key = f"scans/{scan_id}/brightness"
        if key not in self.root:
            raise InputError(f"{self.path}: scan {scan_id!r} has no brightness map; build the dataset again")
        return self.root[key][...]

    def mean_spectrum(self, sample_id: str) -> np.ndarray:
        """A sample's mean stored spectrum ``(C,)`` float64 over the masked pixels of all its scans."""
        total, count = np.zeros(self.n_channels), 0
        for scan in self.samples[sample_id].scans:
            mask = self.mask(scan)
            total = total + self.cube(scan)[...][:, mask].sum(axis=1, dtype=np.float64)
            count += int(mask.sum())
        return total / max(count, 1)

    def raw_window(self, scan_id: str, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Stored (physical-unit) values of a window ``(C, y1-y0, x1-x0)``; outside the scan NaN."""
        h, w = self.shape(scan_id)
        out = np.full((self.n_channels, y1 - y0, x1 - x0), np.nan, np.float32)
        ya, yb, xa, xb = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if ya < yb and xa < xb:
            out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = self.cube(scan_id)[:, ya:yb, xa:xb]
        return out

    def model_input(self, x: np.ndarray) -> np.ndarray:
        """:func:`chemmap.preprocess.scan.model_input` with this dataset's recipe."""
        return model_input(x, self.recipe)

    def truth(self, scan_id: str) -> dict[str, np.ndarray] | None:
        """True maps of a scan (synthetic data only): ``{target: (lines, samples)}``, else None."""
        key = f"scans/{scan_id}/truth"
        if key not in self.root:
            return None
        group = self.root[key]
        return {name: group[name][...] for name in sorted(group.array_keys())}

    def patch_index(self) -> PatchIndex:
        """The patch index preprocessing made for the configured model geometry."""
        name = self.attrs.get("patches")
        if not name or f"patches/{name}" not in self.root:
            raise InputError(f"{self.path}: the dataset has no patch index; preprocess it again")
        arr = self.root[f"patches/{name}"]
        a = arr.attrs
        return PatchIndex(int(a["core"]), int(a["halo"]), int(a["stride"]), np.asarray(arr[...]))


def open_dataset(store: str | Path) -> Dataset:
    """The finished dataset at ``store`` (one line naming it if it is missing or unfinished)."""
    return Dataset(store)
