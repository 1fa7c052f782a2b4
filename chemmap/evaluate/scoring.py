"""The test split, scored once: the U-Net ensemble, each fold model, and every map baseline.

Each test scan is read once. The U-Net's members map it (their mean is the ensemble's map,
bit for bit what :class:`~chemmap.inference.ensemble.MapEnsemble` gives); the full PLS
model maps it pixel by pixel, and every baseline is made from that map at the settings the
protocol chose on the training splits (:mod:`chemmap.evaluate.protocol`). Each map goes
into a :class:`~chemmap.evaluate.metrics.MapTally` of its method; the maps themselves are
dropped, except those drawn as figures and the ensemble's maps, written as ``chemmap score``
writes its maps (``maps/<scan>.zarr``), so a scan scored later can be compared with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from chemmap.errors import InputError
from chemmap.evaluate.baselines import (
    SIGMAS,
    BaselineMap,
    brightness_map,
    flat_map,
    pls_candidates,
    setting_key,
    smoothed_brightness,
)
from chemmap.evaluate.blindspot import MapDenoiser
from chemmap.evaluate.metrics import TISSUE_FAT_THRESHOLD, MapTally
from chemmap.evaluate.protocol import LABEL_FREE, Choices
from chemmap.figures import plot_maps
from chemmap.inference.ensemble import MapEnsemble, bound_map, member_maps
from chemmap.inference.score_output import write_map_zarr
from chemmap.models.pls import PLSBaseline
from chemmap.models.tiling import Geometry
from chemmap.preprocess.store import Dataset
from chemmap.spatial import coarse_mask

__all__ = [
    "HEADROOM",
    "N_MAP_FIGURES",
    "EvaluatedModels",
    "StoredInput",
    "TestScores",
    "lab_values",
    "method_roles",
    "score_test_split",
    "target_index",
]

N_MAP_FIGURES = 4  # test samples drawn as map figures
# Maps that are not competitors: they use the sample's lab value, or the test split's truth.
HEADROOM = {
    "flat_lab": "headroom: uses the lab value",
    "brightness_lab": "headroom: uses the lab value",
    "pls_gauss_oracle": "headroom: sigma chosen on the test truth",
}
MODEL_LABELS = {"unet": "U-Net", "pls": "PLS", **{m: m for m in LABEL_FREE if m != "pls"}}


def method_roles(folds: Sequence[int]) -> dict[str, str]:
    """Every map method of the report, in table order, with what it is."""
    roles = {"unet": "model: the fold ensemble"}
    roles |= {f"unet_fold{k}": f"model: fold {k} alone" for k in folds}
    roles["unet_unbounded"] = "reference: the fold ensemble before the 0-100 % bound (model.bounded)"
    roles |= dict.fromkeys(LABEL_FREE, "baseline: label-free")
    return roles | HEADROOM


class StoredInput:
    """Model input of a stored scan, ``(C, H, W)``: :meth:`Dataset.model_input` of what is read.

    Reads like an array (``shape``, ``x[...]``, ``x[:, y0:y1, x0:x1]``), so a large scan is
    scored tile by tile without ever being read whole.
    """

    def __init__(self, data: Dataset, scan_id: str) -> None:
        self.data = data
        self.cube = data.cube(scan_id)
        self.shape = tuple(self.cube.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.data.model_input(np.asarray(self.cube[key]))


def target_index(data: Dataset, targets: Sequence[str]) -> list[int]:
    """Positions of ``targets`` among the dataset's targets (lab values and model outputs)."""
    missing = [t for t in targets if t not in data.targets]
    if missing:
        raise InputError(f"{data.path}: targets {missing} are not in the dataset (it has {data.targets})")
    return [data.targets.index(t) for t in targets]


def lab_values(data: Dataset, sample_ids: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    """Lab values ``(n_samples, T)`` float64 of ``targets``, in the order of ``sample_ids``."""
    index = target_index(data, targets)
    return np.array([[data.samples[s].targets[i] for i in index] for s in sample_ids])


@dataclass(frozen=True)
class EvaluatedModels:
    """What scores the test split.

    Attributes:
        unet: the fold ensemble; ``channels`` are its outputs for the evaluated targets;
            ``folds`` the fold of each member.
        geometry: its tiling geometry (for scans scored in tiles).
        pls: the baseline fitted on all training samples, outputs in the targets' order.
        choices: target -> the protocol's settings.
        denoisers: target -> the ``pls_n2v`` baseline's denoiser (``evaluate.blindspot_steps``).
    """

    unet: MapEnsemble
    channels: list[int]
    folds: list[int]
    geometry: Geometry
    pls: PLSBaseline
    choices: dict[str, Choices]
    denoisers: dict[str, MapDenoiser] = field(default_factory=dict)


@dataclass
class TestScores:
    """The test split as every method sees it.

    Attributes:
        sample_ids: test samples, sorted.
        reference: ``(n, T)`` lab values.
        predictions: ``unet``/``pls`` -> ``(n, T)`` predicted sample means (U-Net: mean of its
            map over the sample pixels; PLS: applied to the mean spectrum, as the paper does).
        tallies: target -> method (or ``pls_gauss@<sigma>``) -> its maps' tally.
        figures: map figures drawn.
    """

    sample_ids: list[str]
    reference: np.ndarray
    predictions: dict[str, np.ndarray]
    tallies: dict[str, dict[str, MapTally]]
    figures: list[Path] = field(default_factory=list)


def _unet_maps(data: Dataset, scan_id: str, models: EvaluatedModels) -> tuple[dict[str, Any], int]:
    """``{method: ((T, H, W) full, (T, h, w) native or None)}`` of the ensemble and each member,
    and the native grid's step."""
    maps = member_maps(models.unet, StoredInput(data, scan_id), models.geometry)
    ch = models.channels
    full, native = maps.ensemble()
    out = {"unet": (full[ch], None if native is None else native[ch])}
    for m, k in enumerate(models.folds):  # each alone, bounded as the ensemble is
        fold_native = None if maps.native is None else bound_map(maps.native[m][ch], maps.bound)
        out[f"unet_fold{k}"] = (bound_map(maps.full[m][ch], maps.bound), fold_native)
    if maps.bound is not None:  # what the clamp changed
        full, native = maps.ensemble(bounded=False)
        out["unet_unbounded"] = (full[ch], None if native is None else native[ch])
    return out, maps.step


def _as_baseline(full: np.ndarray, native: np.ndarray | None, mask: np.ndarray, step: int) -> BaselineMap:
    """A U-Net map on both grids (native NaN outside the coarse mask)."""
    full = np.where(mask, full, np.nan).astype(np.float32)
    if native is None:
        return BaselineMap(full, full, mask)
    nmask = coarse_mask(mask, step)
    return BaselineMap(full, np.where(nmask, native, np.nan).astype(np.float32), nmask)


def _scan_methods(
    brightness: np.ndarray, mask: np.ndarray, pls_map: np.ndarray, lab: float, choices: Choices
) -> dict[str, BaselineMap]:
    """Every baseline of one target on one test scan; smoothed PLS at every sigma (for the oracle)."""
    candidates = pls_candidates(pls_map, mask)
    out = {m: candidates[choices.setting(m)] for m in LABEL_FREE if choices.setting(m) in candidates}
    out |= {setting_key("pls_gauss", s): candidates[setting_key("pls_gauss", s)] for s in SIGMAS}
    out["flat_lab"] = flat_map(mask, lab)
    if choices.brightness_sigma is not None:
        b = smoothed_brightness(brightness, mask, choices.brightness_sigma)
        out["brightness_lab"] = brightness_map(b, mask, lab, choices.brightness_slope)
    return out


def _score_scan(
    data: Dataset,
    sid: str,
    scan_id: str,
    models: EvaluatedModels,
    targets: Sequence[str],
    scores: TestScores,
    k: int,
) -> dict[str, dict[str, BaselineMap]]:
    """One test scan's maps of every method into the tallies; returns them (target -> method -> map)."""
    mask = data.mask(scan_id)
    truth = data.truth(scan_id) or {}
    cube = np.asarray(data.cube(scan_id)[...])
    brightness = data.brightness(scan_id)
    unet, step = _unet_maps(data, scan_id, models)
    pls = models.pls.predict_cube(cube, mask)  # (T, H, W)
    fat = truth.get("fat")
    tissue = None if fat is None else fat >= TISSUE_FAT_THRESHOLD
    out = {}
    for j, t in enumerate(targets):
        maps = {
            name: _as_baseline(full[j], None if native is None else native[j], mask, step)
            for name, (full, native) in unet.items()
        }
        maps |= _scan_methods(brightness, mask, pls[j], float(scores.reference[k, j]), models.choices[t])
        if t in models.denoisers:
            maps["pls_n2v"] = BaselineMap.on_scan_grid(models.denoisers[t].apply(pls[j]), mask).clipped()
        for name, bm in maps.items():
            scores.tallies[t].setdefault(name, MapTally()).add(
                sid,
                bm.full,
                mask,
                truth.get(t),
                native=(bm.native, bm.native_mask),
                fat_tissue=tissue,
                name=f"{name} map of {scan_id}",
            )
        out[t] = maps
    return out


def _draw(
    scan_id: str,
    maps: dict[str, BaselineMap],
    truth: np.ndarray | None,
    best: str | None,
    title: str,
    folder: Path,
) -> Path:
    """``map_<scan>.png``: the truth, the U-Net and the best label-free baseline on one scale."""
    shown = {"U-Net": maps["unet"].full}
    if best is not None:
        shown[f"{best} (best label-free)"] = maps[best].full
    if truth is not None:
        shown["truth"] = truth
    return plot_maps(shown, folder / f"map_{scan_id}.png", title=title)


def _write_test_map(
    folder: Path, data: Dataset, scan_id: str, maps: dict[str, dict[str, BaselineMap]], targets: Sequence[str]
) -> Path:
    """``maps/<scan>.zarr``: the ensemble's test map in ``chemmap score``'s format, to compare with."""
    stack = np.stack([maps[t]["unet"].full for t in targets])  # (T, H, W)
    attrs = {
        "scan_id": scan_id,
        "model_name": "evaluate",
        "model_version": "",
        "recipe": data.recipe.to_dict(),
    }
    return write_map_zarr(
        folder / "maps" / f"{scan_id}.zarr", stack, data.mask(scan_id), targets=targets, attrs=attrs
    )


def score_test_split(
    data: Dataset,
    spectra: dict[str, np.ndarray],
    models: EvaluatedModels,
    targets: Sequence[str],
    folder: Path,
    *,
    progress: bool = True,
    tick: Callable[[], Any] | None = None,
) -> TestScores:
    """Every method on every test scan (split 0); the first :data:`N_MAP_FIGURES` samples are drawn."""
    test_ids = data.ids([0])
    if len(test_ids) < 2:
        raise InputError(f"{data.path}: the test split (0) has {len(test_ids)} samples; need at least 2")
    reference = lab_values(data, test_ids, targets)
    scores = TestScores(
        sample_ids=test_ids,
        reference=reference,
        predictions={"pls": models.pls.predict(np.stack([spectra[s] for s in test_ids]))},
        tallies={t: {} for t in targets},
    )
    best = models.choices[targets[0]].best_label_free
    bar = track(test_ids, description="evaluate", disable=not progress or tick is not None)
    for k, sid in enumerate(bar):
        for scan_id in data.samples[sid].scans:
            maps = _score_scan(data, sid, scan_id, models, targets, scores, k)
            _write_test_map(folder, data, scan_id, maps, targets)
            if k < N_MAP_FIGURES:
                truth = (data.truth(scan_id) or {}).get(targets[0])
                title = f"{scan_id}: {targets[0]} (lab {reference[k, 0]:.1f} %)"
                scores.figures.append(_draw(scan_id, maps[targets[0]], truth, best, title, folder))
        if tick is not None:
            tick()
    scores.predictions["unet"] = np.array(
        [[scores.tallies[t]["unet"].sample_means()[sid] for t in targets] for sid in test_ids]
    )
    return scores
