"""Flags that say when not to trust a map: a scan unlike the training data, or badly recorded.

For every scored scan, ``summary.csv`` gets numbers that compare it with the data the model
was trained on, and a ``flags`` column naming each limit the scan exceeds:

- ``t2`` (Hotelling T²) and ``q`` (the Q residual, or squared prediction error) of the scan's
  mean spectrum in a PCA of the training samples' mean spectra (:class:`SpectralModel`). T² is
  large for a spectrum at an extreme of the variation the training data showed; Q for one
  with variation they never showed (another tissue, a frozen sample, a fouled window);
- the masked area (sample pixels; already ``mask_pixels`` in ``summary.csv``) and the
  saturated share of the sample's pixels;
- the white reference's age, where both headers carry an acquisition time
  (:func:`white_reference_age_hours`).

The rules, all stated here and in :func:`fit_spectral_model`:

- **PCA.** Fitted on the mean spectra (masked pixels of all their scans, float64, in the
  dataset's preprocessed units) of the training samples (every split but 0); centred, and
  divided by each channel's standard deviation only with ``scale=True``. Components: the
  fewest whose cumulative share of the variance is >= ``explained`` (default 0.99), capped at
  ``max_components`` (default 10) and at ``n - 2`` for the smallest ``n`` a PCA is fitted on
  (all training samples, or those outside one fold), so that every PCA has the same number of
  components and fewer than its samples minus one.
- **T² and Q limits.** The ``percentile`` (default 99; the pipeline's ``flags.percentile``,
  which the register stage passes here) of the training scans' own values, computed out of
  fold: each fold's scans are scored by the PCA of the other folds' samples (same number of
  components), so that the limits include what a sample unseen by the PCA looks like and
  are not optimistic.
- **Masked area.** Lower limit: the ``100 - percentile`` (default 1st) percentile of the
  training scans' ``mask_pixels``.
- **Saturated share.** ``bad_pixels_in_mask / (mask_pixels + bad_pixels_in_mask)``: the share
  of the sample's pixels taken out as saturated or dead (:func:`saturated_share`). Upper
  limit: the ``percentile`` (default 99th) percentile of the training scans' shares.
- **White age.** The caller's ``max_white_age_hours`` (not learnt from data); either sign
  counts (a white recorded long after the scan is as far from it as one recorded before).

With ``n`` training scans (``n < 100``), an empirical 99th percentile sits near their
largest value, and a new normal scan exceeds it with a probability of about ``1 / (n + 1)``
or more per limit: with few training samples, expect some flags on good scans.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time
from typing import Any

import numpy as np

from chemmap.errors import ConfigError, InputError
from chemmap.preprocess.store import Dataset

__all__ = [
    "SPECTRAL_MODEL_VERSION",
    "ScanFlags",
    "SpectralModel",
    "acquisition_time",
    "fit_spectral_model",
    "flags_columns",
    "saturated_share",
    "scan_flags",
    "scan_mean_spectrum",
    "white_reference_age_hours",
]

SPECTRAL_MODEL_VERSION = 1  # in to_dict(); from_dict() refuses another
_BLOCK_LINES = 256  # lines of a cube read at once when averaging it (bounds memory on large scans)
_COLUMNS = ("t2", "q", "saturated_share", "white_age_h", "flags")


# ---------------------------------------------------------------------------------------------
# PCA
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pca:
    """A fitted PCA: ``z = (x - mean) / scale``, scores ``t = loadings @ z``."""

    mean: np.ndarray  # (C,)
    scale: np.ndarray  # (C,)
    loadings: np.ndarray  # (k, C) orthonormal rows
    eigenvalues: np.ndarray  # (k,) variance of the training scores, ddof 1
    explained: float  # share of the training variance the k components explain

    def t2_q(self, spectra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hotelling T² and Q of spectra ``(n, C)``: two float64 ``(n,)``."""
        z = (np.asarray(spectra, np.float64) - self.mean) / self.scale  # (n, C)
        t = z @ self.loadings.T  # (n, k)
        t2 = (t**2 / self.eigenvalues).sum(axis=1)
        residual = z - t @ self.loadings  # (n, C)
        return t2, (residual**2).sum(axis=1)


def _n_components(variances: np.ndarray, explained: float, cap: int) -> int:
    """The fewest components whose cumulative share of ``variances`` is >= ``explained``, <= ``cap``."""
    share = np.cumsum(variances) / variances.sum()
    k = int(np.searchsorted(share, explained - 1e-12) + 1)
    return max(1, min(k, cap, variances.size))


def _fit_pca(
    spectra: np.ndarray, *, scale: bool, explained: float, cap: int, n_components: int | None = None
) -> _Pca:
    """PCA of ``spectra (n, C)``: ``n_components`` if given, else :func:`_n_components`."""
    x = np.asarray(spectra, np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0, ddof=1) if scale else np.ones(x.shape[1])
    std = np.where(std > 0, std, 1.0)
    z = (x - mean) / std
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    variances = s**2 / (x.shape[0] - 1)
    if not variances.sum() > 0:
        raise InputError(f"the {x.shape[0]} training mean spectra are all the same; no PCA to fit")
    k = n_components if n_components is not None else _n_components(variances, explained, cap)
    k = min(k, int((variances > variances[0] * 1e-12).sum()))  # a zero variance has no T² axis
    return _Pca(mean, std, vt[:k].copy(), variances[:k].copy(), float(variances[:k].sum() / variances.sum()))


# ---------------------------------------------------------------------------------------------
# The spectral model: PCA and limits, stored as plain JSON
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralModel:
    """What the training data looked like: a PCA of their mean spectra and the flags' limits.

    Stored as plain lists (:meth:`to_dict`), never pickled. See the module's docstring for
    the rules behind every number.

    Attributes:
        wavelengths: ``(C,)`` channel centres, nm (the recipe's output channels).
        mean: ``(C,)`` the training samples' mean spectrum, preprocessed units.
        scale: ``(C,)`` the divisor after centring: channel standard deviations, or ones.
        loadings: ``(k, C)`` orthonormal principal axes, rows.
        eigenvalues: ``(k,)`` variance of the training scores along each axis (ddof 1).
        explained: share of the training variance the ``k`` components explain.
        n_samples: training samples the PCA was fitted on.
        n_scans: training scans the limits were taken from.
        percentile: the percentile of the upper limits (T², Q, saturated share); the area's
            lower limit is at ``100 - percentile``.
        out_of_fold: whether T² and Q limits come from out-of-fold scores (else in-sample).
        t2_limit, q_limit: upper limits of T² (dimensionless) and Q (squared, scaled units).
        min_mask_pixels: lower limit of the masked area, px.
        max_saturated_share: upper limit of the saturated share, 0-1.
    """

    wavelengths: tuple[float, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    loadings: tuple[tuple[float, ...], ...]
    eigenvalues: tuple[float, ...]
    explained: float
    n_samples: int
    n_scans: int
    percentile: float
    out_of_fold: bool
    t2_limit: float
    q_limit: float
    min_mask_pixels: float
    max_saturated_share: float

    @property
    def n_components(self) -> int:
        return len(self.eigenvalues)

    @property
    def n_channels(self) -> int:
        return len(self.mean)

    def _pca(self) -> _Pca:
        return _Pca(
            np.asarray(self.mean, np.float64),
            np.asarray(self.scale, np.float64),
            np.asarray(self.loadings, np.float64).reshape(self.n_components, self.n_channels),
            np.asarray(self.eigenvalues, np.float64),
            self.explained,
        )

    def score(self, mean_spectrum: np.ndarray | Sequence[float]) -> tuple[float, float]:
        """Hotelling T² and Q of one mean spectrum.

        Args:
            mean_spectrum: ``(C,)`` a scan's mean over its sample pixels, in the dataset's
                preprocessed units (:func:`scan_mean_spectrum`).

        Returns:
            ``(t2, q)``: T² (sum over components of score² / eigenvalue) and Q (squared norm
            of the residual after the ``k`` components), in the PCA's (scaled) units.

        Raises:
            InputError: wrong number of channels, or a value that is not finite.
        """
        x = np.asarray(mean_spectrum, np.float64)
        if x.shape != (self.n_channels,):
            raise InputError(
                f"mean spectrum has shape {x.shape}, the spectral model expects ({self.n_channels},)"
            )
        if not np.isfinite(x).all():
            raise InputError(f"mean spectrum has {int((~np.isfinite(x)).sum())} values that are not finite")
        t2, q = self._pca().t2_q(x[None])
        return float(t2[0]), float(q[0])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (lists, numbers, a version) for the bundle's manifest."""
        d = asdict(self)
        d["loadings"] = [list(row) for row in self.loadings]
        for key in ("wavelengths", "mean", "scale", "eigenvalues"):
            d[key] = list(d[key])
        return {"version": SPECTRAL_MODEL_VERSION, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpectralModel:
        """The model :meth:`to_dict` wrote; one line naming what is missing or malformed."""
        if d.get("version") != SPECTRAL_MODEL_VERSION:
            raise InputError(
                f"spectral model version {d.get('version')!r} is not {SPECTRAL_MODEL_VERSION}; "
                "register the model again"
            )
        missing = [f for f in cls.__dataclass_fields__ if f not in d]
        if missing:
            raise InputError(f"spectral model has no {', '.join(missing)}")
        try:
            model = _model_from_fields(d)
        except (TypeError, ValueError) as err:
            raise InputError(f"spectral model is malformed ({err})") from None
        shapes = {len(model.wavelengths), len(model.scale), *(len(r) for r in model.loadings)}
        if shapes != {model.n_channels} or len(model.loadings) != model.n_components:
            raise InputError(
                f"spectral model is inconsistent: {model.n_channels} channels, "
                f"{model.n_components} eigenvalues, loadings {len(model.loadings)} rows"
            )
        return model


def _model_from_fields(d: Mapping[str, Any]) -> SpectralModel:
    """:class:`SpectralModel` from :meth:`SpectralModel.to_dict`'s fields, converted and unchecked."""
    vec = lambda key: tuple(float(v) for v in d[key])  # noqa: E731
    return SpectralModel(
        wavelengths=vec("wavelengths"),
        mean=vec("mean"),
        scale=vec("scale"),
        loadings=tuple(tuple(float(v) for v in row) for row in d["loadings"]),
        eigenvalues=vec("eigenvalues"),
        explained=float(d["explained"]),
        n_samples=int(d["n_samples"]),
        n_scans=int(d["n_scans"]),
        percentile=float(d["percentile"]),
        out_of_fold=bool(d["out_of_fold"]),
        t2_limit=float(d["t2_limit"]),
        q_limit=float(d["q_limit"]),
        min_mask_pixels=float(d["min_mask_pixels"]),
        max_saturated_share=float(d["max_saturated_share"]),
    )


# ---------------------------------------------------------------------------------------------
# Fitting it on a dataset
# ---------------------------------------------------------------------------------------------


def _masked_sum(cube: Any, mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Sum ``(C,)`` float64 of a cube ``(C, lines, samples)`` (NumPy or Zarr) over ``mask``, and its count."""
    mask = np.asarray(mask, bool)
    total = np.zeros(cube.shape[0], np.float64)
    for y0 in range(0, mask.shape[0], _BLOCK_LINES):
        m = mask[y0 : y0 + _BLOCK_LINES]
        if m.any():
            block = np.asarray(cube[:, y0 : y0 + _BLOCK_LINES])  # (C, lines, samples)
            total += block[:, m].sum(axis=1, dtype=np.float64)
    return total, int(mask.sum())


def scan_mean_spectrum(cube: Any, mask: np.ndarray) -> np.ndarray:
    """A scan's mean spectrum: ``(C,)`` float64 mean of ``cube`` over the sample pixels.

    Args:
        cube: ``(C, lines, samples)`` preprocessed, not normalised (the dataset's units,
            :func:`chemmap.preprocess.scan.transform`'s ``cube``); NumPy or Zarr.
        mask: ``(lines, samples)`` bool sample pixels.

    Raises:
        InputError: the mask holds no pixel or does not match the cube.
    """
    if tuple(np.shape(mask)) != tuple(cube.shape[1:]):
        raise InputError(f"mask {tuple(np.shape(mask))} does not match the cube's {tuple(cube.shape[1:])}")
    total, count = _masked_sum(cube, mask)
    if count == 0:
        raise InputError("the scan's mask holds no sample pixel; it has no mean spectrum")
    return total / count


def saturated_share(mask_pixels: int, bad_removed: int) -> float:
    """The share of a sample's pixels taken out as saturated or dead, 0-1.

    Args:
        mask_pixels: sample pixels kept (``mask.sum()`` after the bad ones are removed).
        bad_removed: bad pixels removed from the mask (``ScanMap.bad_removed``, the scan
            table's ``bad_pixels_in_mask``).
    """
    total = int(mask_pixels) + int(bad_removed)
    return float(bad_removed) / total if total > 0 else 0.0


@dataclass(frozen=True)
class _Training:
    """The training samples' mean spectra and their scans' values, read once from the dataset."""

    folds: np.ndarray  # (n,) split of each training sample
    spectra: np.ndarray  # (n, C) sample mean spectra
    scan_folds: np.ndarray  # (m,) split of each training scan's sample
    scan_spectra: np.ndarray  # (m, C) scan mean spectra
    mask_pixels: np.ndarray  # (m,) px
    shares: np.ndarray  # (m,) saturated share, 0-1


def _read_training(data: Dataset) -> _Training:
    """Mean spectra of every training sample (all its scans' pixels) and of each of its scans."""
    table = {row["scan_id"]: row for row in data.scan_table}
    folds, spectra, scans = [], [], []  # scans: (fold, spectrum, pixels, share)
    for sid in data.ids([s for s in data.splits if s != 0]):
        split, total, count = data.samples[sid].split, np.zeros(data.n_channels), 0
        for scan in data.samples[sid].scans:
            s, n = _masked_sum(data.cube(scan), data.mask(scan))
            if n:
                total, count = total + s, count + n
                bad = int(table.get(scan, {}).get("bad_pixels_in_mask", 0))
                scans.append((split, s / n, n, saturated_share(n, bad)))
        if count:
            folds.append(split)
            spectra.append(total / count)
    empty = np.empty((0, data.n_channels))
    return _Training(
        folds=np.asarray(folds, np.int64),
        spectra=np.stack(spectra) if spectra else empty,
        scan_folds=np.asarray([r[0] for r in scans], np.int64),
        scan_spectra=np.stack([r[1] for r in scans]) if scans else empty,
        mask_pixels=np.asarray([r[2] for r in scans], np.int64),
        shares=np.asarray([r[3] for r in scans], np.float64),
    )


def _check_settings(percentile: float, explained: float, max_components: int) -> None:
    if not 50.0 < percentile < 100.0:  # the bounds of flags.percentile (chemmap.config says why)
        raise ConfigError(f"percentile must be in (50, 100), got {percentile}")
    if not 0.0 < explained <= 1.0:
        raise ConfigError(f"explained must be in (0, 1], got {explained}")
    if max_components < 1:
        raise ConfigError(f"max_components must be >= 1, got {max_components}")


def _component_cap(tr: _Training, max_components: int, out_of_fold: bool, source: str) -> int:
    """Components allowed: <= ``max_components`` and < (samples of the smallest PCA) - 1."""
    n = len(tr.folds)
    folds = np.unique(tr.folds)
    if out_of_fold and folds.size < 2:
        raise InputError(
            f"{source}: the training samples are in {folds.size} fold(s); out-of-fold limits need "
            ">= 2 (or fit with out_of_fold=False)"
        )
    smallest = min((n - int((tr.folds == f).sum()) for f in folds), default=n) if out_of_fold else n
    if smallest < 3:
        raise InputError(
            f"{source}: a PCA of the training mean spectra would be fitted on {smallest} samples; "
            "it needs >= 3"
        )
    return min(max_components, smallest - 2)


def _scan_scores(tr: _Training, full: _Pca, *, scale: bool, out_of_fold: bool) -> tuple[np.ndarray, ...]:
    """T² and Q ``(n_scans,)`` of every training scan: by the other folds' PCA, or by ``full``."""
    x = tr.scan_spectra  # (n_scans, C)
    if not out_of_fold:
        return full.t2_q(x)
    t2, q = np.empty(len(x)), np.empty(len(x))
    k = full.loadings.shape[0]
    for f in np.unique(tr.folds):
        pca = _fit_pca(tr.spectra[tr.folds != f], scale=scale, explained=1.0, cap=k, n_components=k)
        rows = tr.scan_folds == f
        t2[rows], q[rows] = pca.t2_q(x[rows])
    return t2, q


def fit_spectral_model(
    data: Dataset,
    *,
    percentile: float = 99.0,
    explained: float = 0.99,
    max_components: int = 10,
    scale: bool = False,
    out_of_fold: bool = True,
) -> SpectralModel:
    """The PCA of the training samples' mean spectra and the limits of every flag.

    Reads every training scan's cube once (a block of lines at a time). The rules are the
    module docstring's.

    Args:
        data: the dataset the model was trained on; its training samples are all splits but 0.
        percentile: of the training values, for the upper limits (T², Q, saturated share);
            the masked area's lower limit is at ``100 - percentile``. In (50, 100): the
            pipeline's ``flags.percentile`` (:class:`chemmap.config.FlagsSection`).
        explained: the components explain at least this share of the variance. In (0, 1].
        max_components: at most this many components.
        scale: divide each channel by its training standard deviation after centring.
        out_of_fold: T² and Q limits from out-of-fold scores (each fold's scans scored by the
            PCA of the other folds; needs >= 2 training folds); False: in-sample scores.

    Raises:
        ConfigError: a setting outside its range.
        InputError: too few training samples or folds, or spectra that do not vary.
    """
    _check_settings(percentile, explained, max_components)
    tr = _read_training(data)
    cap = _component_cap(tr, max_components, out_of_fold, str(data.path))
    full = _fit_pca(tr.spectra, scale=scale, explained=explained, cap=cap)
    t2, q = _scan_scores(tr, full, scale=scale, out_of_fold=out_of_fold)
    return SpectralModel(
        wavelengths=tuple(float(w) for w in data.recipe.wavelengths),
        mean=tuple(float(v) for v in full.mean),
        scale=tuple(float(v) for v in full.scale),
        loadings=tuple(tuple(float(v) for v in row) for row in full.loadings),
        eigenvalues=tuple(float(v) for v in full.eigenvalues),
        explained=full.explained,
        n_samples=len(tr.folds),
        n_scans=len(tr.scan_folds),
        percentile=float(percentile),
        out_of_fold=out_of_fold,
        t2_limit=float(np.percentile(t2, percentile)),
        q_limit=float(np.percentile(q, percentile)),
        min_mask_pixels=float(np.percentile(tr.mask_pixels, 100.0 - percentile)),
        max_saturated_share=float(np.percentile(tr.shares, percentile)),
    )


# ---------------------------------------------------------------------------------------------
# One scan's flags
# ---------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _significant(value: float | None, digits: int = 6) -> float | None:
    """``value`` to ``digits`` significant digits (None stays None)."""
    return None if value is None else float(f"{value:.{digits}g}")


@dataclass(frozen=True)
class ScanFlags:
    """One scan against the training data.

    Attributes:
        t2, q: Hotelling T² and Q of the scan's mean spectrum (:meth:`SpectralModel.score`).
        mask_pixels: sample pixels, px.
        saturated_share: share of the sample's pixels removed as saturated or dead, 0-1.
        white_age_hours: scan time minus the white reference's time, h; None if unknown.
        flags: one entry per limit exceeded, in this order: ``t2>L``, ``q>L``, ``area<L``,
            ``saturated>L``, ``white_age>Lh`` (``L`` the limit, 4 significant digits).
    """

    t2: float
    q: float
    mask_pixels: int
    saturated_share: float
    white_age_hours: float | None
    flags: list[str]

    def row(self) -> dict[str, Any]:
        """The scan's values for ``summary.csv``, keyed by :func:`flags_columns`.

        ``mask_pixels`` is not among them: ``summary.csv`` has it already. ``flags`` is the
        flags joined by ``;`` (empty when none).
        """
        return {
            "t2": _significant(self.t2),
            "q": _significant(self.q),
            "saturated_share": _significant(self.saturated_share),
            "white_age_h": None if self.white_age_hours is None else round(self.white_age_hours, 3),
            "flags": ";".join(self.flags),
        }


def flags_columns() -> list[str]:
    """The columns :meth:`ScanFlags.row` adds to ``summary.csv``, in order.

    ``t2``, ``q``: the scan's mean spectrum against the training data; ``saturated_share``:
    share of the sample's pixels removed as saturated or dead (0-1); ``white_age_h``: hours
    from the white reference to the scan (empty when a header has no time); ``flags``: each
    limit exceeded, ``;``-separated (e.g. ``q>0.004;area<2100``).
    """
    return list(_COLUMNS)


def _check_scan_values(mask_pixels: int, share: float, age: float | None, max_age: float | None) -> None:
    if int(mask_pixels) < 0:
        raise InputError(f"mask_pixels must be >= 0, got {mask_pixels}")
    if not 0.0 <= share <= 1.0:
        raise InputError(f"saturated_share must be in [0, 1], got {share}")
    if age is not None and not math.isfinite(age):
        raise InputError(f"white_age_hours must be finite, got {age}")
    if max_age is not None and not max_age > 0:
        raise ConfigError(f"max_white_age_hours must be > 0, got {max_age}")


def scan_flags(
    model: SpectralModel,
    *,
    mean_spectrum: np.ndarray | Sequence[float],
    mask_pixels: int,
    saturated_share: float,
    white_age_hours: float | None = None,
    max_white_age_hours: float | None = None,
) -> ScanFlags:
    """A scan's numbers and the limits of ``model`` it exceeds.

    Args:
        model: the training data's :class:`SpectralModel`.
        mean_spectrum: ``(C,)`` the scan's mean over its sample pixels (:func:`scan_mean_spectrum`).
        mask_pixels: the scan's sample pixels, px.
        saturated_share: :func:`saturated_share` of the scan, 0-1.
        white_age_hours: :func:`white_reference_age_hours`; None when unknown (never flagged).
        max_white_age_hours: flag a white reference older (or younger) than this, h; None: no limit.

    Raises:
        InputError: a spectrum of the wrong length or not finite, a negative area, a share
            outside 0-1.
    """
    _check_scan_values(mask_pixels, saturated_share, white_age_hours, max_white_age_hours)
    t2, q = model.score(mean_spectrum)
    flags = []
    if t2 > model.t2_limit:
        flags.append(f"t2>{_fmt(model.t2_limit)}")
    if q > model.q_limit:
        flags.append(f"q>{_fmt(model.q_limit)}")
    if mask_pixels < model.min_mask_pixels:
        flags.append(f"area<{_fmt(model.min_mask_pixels)}")
    if saturated_share > model.max_saturated_share:
        flags.append(f"saturated>{_fmt(model.max_saturated_share)}")
    too_old = white_age_hours is not None and max_white_age_hours is not None
    if too_old and abs(white_age_hours) > max_white_age_hours:  # type: ignore[arg-type]
        flags.append(f"white_age>{max_white_age_hours:g}h")
    return ScanFlags(t2, q, int(mask_pixels), float(saturated_share), white_age_hours, flags)


# ---------------------------------------------------------------------------------------------
# The white reference's age, from ENVI headers
# ---------------------------------------------------------------------------------------------

# Specim's recorder labels its values: 'DATE(dd-mm-yyyy): 24-01-2018', 'UTC TIME: 22:47:35'.
_DATE_LABEL = re.compile(r"^\s*DATE\s*\(\s*([^)]*?)\s*\)\s*:\s*(.*?)\s*$", re.IGNORECASE)
_TIME_LABEL = re.compile(r"^\s*[A-Za-z ]*TIME\s*:\s*(.*?)\s*$", re.IGNORECASE)
_DATE_TOKENS = (("yyyy", "%Y"), ("yy", "%y"), ("mm", "%m"), ("dd", "%d"))


def _text(header: Mapping[str, Any], key: str) -> str | None:
    """The header's value of ``key`` (any letter case) as one stripped string; None if absent or empty."""
    for k, v in header.items():
        if str(k).strip().lower() == key:
            value = v[0] if isinstance(v, list | tuple) and v else v
            text = str(value).strip().strip("{}").strip()
            return text or None
    return None


def _parse_date(text: str) -> date | None:
    """``DATE(<pattern>): <date>`` with its stated pattern, or an ISO date; else None."""
    m = _DATE_LABEL.match(text)
    try:
        if m:
            fmt = m.group(1).lower()
            for token, code in _DATE_TOKENS:
                fmt = fmt.replace(token, code)
            return datetime.strptime(m.group(2), fmt).date()
        return date.fromisoformat(text.replace("/", "-"))  # yyyy-mm-dd only: d/m and m/d are ambiguous
    except ValueError:
        return None


def _parse_time(text: str) -> time | None:
    """``UTC TIME: hh:mm:ss`` or an ISO time (``hh:mm[:ss[.fff]]``, optional zone); else None."""
    m = _TIME_LABEL.match(text)
    try:
        return time.fromisoformat(m.group(1) if m else text)
    except ValueError:
        return None


def _as_utc(t: datetime) -> datetime:
    """Zone-less times are taken as UTC (what Specim writes; only differences are used)."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def acquisition_time(header: Mapping[str, Any]) -> datetime | None:
    """When a scan (or reference) was recorded, from its ENVI header; None when it does not say.

    Recognised, keys in any letter case:

    - ``acquisition time = 2023-05-04T10:11:12Z`` (ENVI's ISO 8601 field; any ISO date-time);
    - ``acquisition date`` with a time in ``acquisition time`` or ``start time``. Dates are
      ISO (``2023-05-04``) or carry their pattern as Specim's recorder writes it
      (``DATE(dd-mm-yyyy): 04-05-2023``, ``DATE(yyyy-mm-dd): 2023-05-04``); times are
      ``hh:mm:ss`` with an optional label (``UTC TIME: 10:11:12``) and fraction or zone.

    A date without a time, or a form not listed, gives None: the age would be a guess.

    Returns:
        A time zone aware datetime (UTC when the header names no zone).
    """
    stamp = _text(header, "acquisition time")
    if stamp is not None and ("T" in stamp or " " in stamp.strip()) and ":" in stamp:
        try:
            return _as_utc(datetime.fromisoformat(stamp.replace(" ", "T", 1)))
        except ValueError:
            pass
    day_text = _text(header, "acquisition date")
    day = _parse_date(day_text) if day_text else None
    clock = _parse_time(stamp) if stamp else None
    if clock is None:
        start = _text(header, "start time")
        clock = _parse_time(start) if start else None
    if day is None or clock is None:
        return None
    return _as_utc(datetime.combine(day, clock))


def white_reference_age_hours(
    scan_header: Mapping[str, Any], white_header: Mapping[str, Any]
) -> float | None:
    """Hours from the white reference's recording to the scan's (:func:`acquisition_time`).

    Args:
        scan_header, white_header: parsed ENVI headers (``chemmap.io.open_scan(...).header``).

    Returns:
        Scan time minus white time, h: positive when the white was recorded first. None when
        either header has no time.
    """
    scan_t, white_t = acquisition_time(scan_header), acquisition_time(white_header)
    if scan_t is None or white_t is None:
        return None
    return (scan_t - white_t).total_seconds() / 3600.0
