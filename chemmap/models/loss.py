"""The paper's loss, term by term, with its normalisers (DESIGN.md "The science", "Loss").

For one sample with prediction ``p`` and mask ``m`` at the model's output geometry and
``N = sum(m)``:

- mean MSE (weight 1): ``(y - sum(p * m) / N) ** 2``;
- smoothness (weight 20 in the paper): ``sum over neighbouring pixel pairs that are both
  in the mask, along x and along y, of (p_a - p_b) ** 2``, divided by ``N``;
- out of range (weight 1e-3): ``sum(m * relu(-p) ** 2) + sum(m * relu(p - 100) ** 2)``,
  a sum, so its weight scales with the image size;
- L2 (weight 1e-3): sum of squared convolution weights, once per optimiser step
  (:func:`l2_penalty`, not part of the per-sample terms).

Per-sample terms are summed over targets (``T`` maps at once; a NaN reference leaves
that target out for that sample) and averaged over the batch.

Each term has one implementation here, written on sums over pixels (:func:`masked_sum`,
:func:`smooth_sum`, :func:`out_of_range_term`) and per-sample normalisers
(:func:`mean_error`, :func:`smooth_term`), so that the multi-scan objective of training
(:mod:`chemmap.train.objective`) and the patched gradient (:mod:`chemmap.models.patched`)
can add the sums over scans or patches before normalising.

The smoothness weight decides how much detail survives, and only the mean is
supervised, so validation RMSE cannot choose it; DESIGN.md notes that weight 1 halved
the per-pixel error of weight 20 on synthetic data. The default stays the paper's 20:
set ``LossConfig(smooth=...)`` from the training config.

Departures from the paper, and options it does not have (docs/loss.md has the details and
what each weight means at another image size or pixel pitch):

- the loss is computed on the full-resolution map (after the model's x2 up-sampling), not
  on the model's half-resolution output grid;
- a smoothness pair counts when both its pixels are in the mask (``pairs="both"``); the
  paper's code counts it by its anchor pixel (``pairs="anchor"``, an option);
- the smoothness penalty may be edge-preserving (:class:`Smoothness`: ``huber``, ``tv``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

TERMS = ("mean", "smooth", "out_of_range")
OOR_NORMS = ("sum", "pixel")  # out_of_range_norm: the term summed over the mask, or per pixel
# percent: what a map of a mass fraction can hold. The one definition: the loss penalises
# outside it, the baselines are clipped to it, and a bounded ensemble is clamped to it.
MAP_RANGE = (0.0, 100.0)
UPPER = MAP_RANGE[1]


PENALTIES = ("quadratic", "huber", "tv")
PAIRS = ("both", "anchor")


@dataclass(frozen=True)
class Smoothness:
    """How a pair of neighbouring pixels is penalised, and which pairs count.

    Attributes:
        penalty: of the difference ``d`` (percent) between the pair: ``"quadratic"`` ``d**2``
            (the paper); ``"huber"`` ``d**2`` up to ``delta`` and ``2 delta |d| - delta**2``
            beyond (the same near 0, linear across an edge, so a fat/lean boundary costs its
            contrast, not its square); ``"tv"`` ``2 delta |d|`` (total variation, scaled to
            meet Huber's linear part, so ``delta`` keeps one meaning).
        delta: percent, where Huber turns linear.
        pairs: ``"both"`` pixels in the mask (chemmap's default), or ``"anchor"``: the pair's
            first pixel (the upper, or the left one) in the mask, as the paper's code masks it.
    """

    penalty: str = "quadratic"
    delta: float = 5.0
    pairs: str = "both"

    def __post_init__(self) -> None:
        if self.penalty not in PENALTIES:
            raise ValueError(f"smooth penalty must be one of {PENALTIES}, got {self.penalty!r}.")
        if self.pairs not in PAIRS:
            raise ValueError(f"smooth pairs must be one of {PAIRS}, got {self.pairs!r}.")
        if not self.delta > 0:
            raise ValueError(f"smooth delta must be > 0, got {self.delta!r}.")

    @classmethod
    def of(cls, weights: Any) -> Smoothness:
        """The smoothness a loss config (or training config's loss section) asks for."""
        return cls(
            penalty=getattr(weights, "smooth_penalty", "quadratic"),
            delta=float(getattr(weights, "smooth_delta", 5.0)),
            pairs=getattr(weights, "smooth_pairs", "both"),
        )

    def cost(self, d: torch.Tensor) -> torch.Tensor:
        """The penalty of differences ``d`` (elementwise)."""
        if self.penalty == "quadratic":
            return d**2
        a = d.abs()
        if self.penalty == "tv":
            return 2.0 * self.delta * a
        return torch.where(a <= self.delta, d**2, 2.0 * self.delta * a - self.delta**2)


QUADRATIC = Smoothness()


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms (the paper's values by default), and the smoothness's form."""

    mean: float = 1.0  # squared error of the masked mean against the lab value
    smooth: float = 20.0  # neighbouring-pixel differences / N (paper: 20; DESIGN.md: 1 may be better)
    out_of_range: float = 1e-3  # squared excursions below 0 and above 100, summed over pixels
    out_of_range_norm: str = "sum"  # "pixel": divided by N, like the smoothness (oor_per)
    l2: float = 1e-3  # squared conv weights, once per optimiser step (see l2_penalty)
    smooth_penalty: str = "quadratic"  # see Smoothness
    smooth_delta: float = 5.0
    smooth_pairs: str = "both"


class TermWeights(Protocol):
    """The per-sample terms' weights: a :class:`LossConfig`, or the training config's loss section."""

    @property
    def mean(self) -> float: ...

    @property
    def smooth(self) -> float: ...

    @property
    def out_of_range(self) -> float: ...


# ----------------------------------------------------------------------------- shapes


def _as_bthw(p: torch.Tensor) -> torch.Tensor:
    if p.ndim == 3:
        return p.unsqueeze(1)  # (B, 1, H, W)
    if p.ndim != 4:
        raise ValueError(f"expected predictions (B, T, H, W) or (B, H, W), got shape {tuple(p.shape)}.")
    return p


def _as_mask(mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mask as (B, 1, H, W) or (B, T, H, W) in p's dtype."""
    given = tuple(mask.shape)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)  # (B, 1, H, W)
    if mask.ndim != 4 or mask.shape[0] != p.shape[0] or mask.shape[-2:] != p.shape[-2:]:
        raise ValueError(
            f"mask shape {given} does not match predictions {tuple(p.shape)}: masks and maps must "
            "share the map's geometry (chemmap.models.tiling.forward_full gives maps at the image's)."
        )
    return mask.to(p.dtype)


def _as_targets(y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    y = y.to(p.dtype)
    if y.ndim == 1:
        y = y.unsqueeze(1)  # (B, 1)
    if y.shape != p.shape[:2]:
        raise ValueError(
            f"targets shape {tuple(y.shape)} does not match predictions (B, T) = {tuple(p.shape[:2])}."
        )
    return y


# ----------------------------------------------------------------------------- terms


def _check_count(n: torch.Tensor) -> None:
    empty = (n <= 0).reshape(len(n) if n.ndim else 1, -1).any(1)  # (B,)
    if bool(empty.any()):
        which = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"empty sample mask for batch element(s) {which}: the masked mean is undefined.")


def output_grid_mask(mask: torch.Tensor, step: int = 2) -> torch.Tensor:
    """A mask brought to a grid ``step`` times coarser: ``(..., H, W)`` bool ->
    ``(..., ceil(H / step), ceil(W / step))``; a coarse pixel is in when at least half of the
    input pixels it covers are (a border block counts only the pixels that exist).

    The training loss's rule, for ``train.loss.grid: output``: a coarse pixel half on the
    sample is trained on (the paper does not say how it reduced its mask; docs/loss.md). The
    evaluation's native-grid metrics use :func:`chemmap.spatial.coarse_mask` instead (every
    covered pixel in): a score compares only cells that are all sample, a loss may use mixed ones."""
    if mask.ndim < 2:
        raise ValueError(f"mask must have at least 2 dimensions (H, W), got shape {tuple(mask.shape)}")
    lead, (h, w) = mask.shape[:-2], mask.shape[-2:]
    m = mask.reshape(-1, 1, h, w).float()
    pad = (0, -w % step, 0, -h % step)  # zeros past the bottom/right: not counted below
    inside = F.avg_pool2d(F.pad(m, pad), step) * step * step  # mask pixels per block
    exists = F.avg_pool2d(F.pad(torch.ones_like(m), pad), step) * step * step  # real pixels per block
    out = 2 * inside >= exists
    return out.reshape(*lead, out.shape[-2], out.shape[-1])


def pixel_count(mask: torch.Tensor) -> torch.Tensor:
    """N per sample (and per target for a per-target mask): ``(B, 1|T)``; an empty mask is an error."""
    n = mask.sum((-2, -1))  # (B, 1|T)
    _check_count(n)
    return n


def masked_sum(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(p * m)`` per sample and target: p (B, T, H, W), mask (B, [1|T], H, W) -> (B, T)."""
    p = _as_bthw(p)
    return (p * _as_mask(mask, p)).sum((-2, -1))  # (B, T)


def mean_error(total: torch.Tensor, n: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean term from sums: ``(y - total / n) ** 2`` -> (B, T); 0 where y is NaN.

    Args:
        total: ``(B, T)`` sums of the masked map (:func:`masked_sum`, added over a
            sample's scans or patches).
        n: ``(B, 1|T)`` in-mask pixel counts (added alike); must be positive.
        y: ``(B, T)`` lab values.
    """
    _check_count(n)
    err = torch.where(torch.isnan(y), torch.zeros_like(y), y - total / n)  # (B, T)
    return err**2


def mean_term(p: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(y - sum(p * m) / N) ** 2`` per sample and target -> (B, T); 0 where y is NaN."""
    p = _as_bthw(p)
    y = _as_targets(y, p)
    return mean_error(masked_sum(p, mask), _as_mask(mask, p).sum((-2, -1)), y)


def neighbour_sum(
    p: torch.Tensor, mask: torch.Tensor, axis: int, smooth: Smoothness = QUADRATIC
) -> torch.Tensor:
    """Sum of the penalty of ``p_b - p_a`` over neighbouring pairs along one axis -> (B, T).

    Args:
        p: ``(B, T, H, W)`` maps.
        mask: ``(B, 1|T, H, W)`` mask.
        axis: -2 for vertical pairs (along y), -1 for horizontal pairs (along x).
        smooth: the penalty and which pairs count (default: ``(p_a - p_b) ** 2``, both in the
            mask).
    """
    p = _as_bthw(p)
    m = _as_mask(mask, p)
    k = p.shape[axis] - 1  # pairs per line
    counted = m.narrow(axis, 0, k)  # the anchor: the upper or left pixel of the pair
    if smooth.pairs == "both":
        counted = counted * m.narrow(axis, 1, k)  # (B, ., H-1, W) or (B, ., H, W-1)
    step = p.narrow(axis, 1, k) - p.narrow(axis, 0, k)  # (B, T, H-1, W) or (B, T, H, W-1)
    return (smooth.cost(step) * counted).sum((-2, -1))  # (B, T)


def smooth_sum(p: torch.Tensor, mask: torch.Tensor, smooth: Smoothness = QUADRATIC) -> torch.Tensor:
    """Sum over counted neighbouring pairs along y and x of the pair's penalty -> (B, T).

    Not yet divided by N (a sample's scans, or the patched gradient's patches, add it first).
    """
    return neighbour_sum(p, mask, -2, smooth) + neighbour_sum(p, mask, -1, smooth)


def smooth_term(p: torch.Tensor, mask: torch.Tensor, smooth: Smoothness = QUADRATIC) -> torch.Tensor:
    """Smoothness per sample and target, divided by N -> (B, T)."""
    p = _as_bthw(p)
    return smooth_sum(p, mask, smooth) / pixel_count(_as_mask(mask, p))


def out_of_range_term(p: torch.Tensor, mask: torch.Tensor, upper: float = UPPER) -> torch.Tensor:
    """``sum(m * relu(-p) ** 2) + sum(m * relu(p - upper) ** 2)`` per sample and target -> (B, T).

    A sum over pixels, not a mean: a sample's scans or patches add it as it is.
    """
    p = _as_bthw(p)
    m = _as_mask(mask, p)
    return (m * (F.relu(-p) ** 2 + F.relu(p - upper) ** 2)).sum((-2, -1))  # (B, T)


def oor_per(weights: Any, count: torch.Tensor) -> torch.Tensor | float:
    """What the out-of-range sum is divided by: 1 (``out_of_range_norm: sum``, the paper's)
    or the sample's in-mask pixel count N (``pixel``)."""
    norm = getattr(weights, "out_of_range_norm", "sum")
    if norm not in OOR_NORMS:
        raise ValueError(f"out_of_range_norm must be one of {OOR_NORMS}, got {norm!r}")
    return count if norm == "pixel" else 1.0


def weighted_total(terms: Mapping[str, Any], weights: TermWeights) -> Any:
    """``sum(weight * term)`` over :data:`TERMS`, for tensors or floats alike.

    The L2 term is not a per-sample term: it is added once per optimiser step, elsewhere.
    """
    mean, smooth, out_of_range = (terms[name] for name in TERMS)
    return weights.mean * mean + weights.smooth * smooth + weights.out_of_range * out_of_range


def sample_loss(
    p: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, config: LossConfig | None = None
) -> dict[str, torch.Tensor]:
    """The per-sample loss terms, summed over targets and averaged over the batch.

    Args:
        p: predictions ``(B, T, H, W)`` (or ``(B, H, W)``) at the output geometry.
        mask: ``(B, H, W)`` or ``(B, 1|T, H, W)`` sample mask at the output geometry;
            1 inside, 0 outside.
        y: lab values ``(B, T)`` (or ``(B,)``); NaN leaves that target out of the mean term.
        config: weights; default :class:`LossConfig`.

    Returns:
        Scalars: each unweighted term ("mean", "smooth", "out_of_range") and "total", the
        weighted sum (L2 excluded: add ``config.l2 * l2_penalty(model)`` once per
        optimiser step).
    """
    config = LossConfig() if config is None else config
    terms = {
        "mean": mean_term(p, mask, y),
        "smooth": smooth_term(p, mask, Smoothness.of(config)),
        "out_of_range": out_of_range_term(p, mask)
        / oor_per(config, pixel_count(_as_mask(mask, _as_bthw(p)))),
    }
    out = {name: value.sum(1).mean() for name, value in terms.items()}  # sum targets, mean batch
    out["total"] = weighted_total(out, config)
    return out


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of squared convolution weights: no biases, no normalisation layers.

    Add ``LossConfig.l2 * l2_penalty(model)`` once per optimiser step (not per sample or
    per patch).
    """
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    weights = [module.weight for module in model.modules() if isinstance(module, convs)]
    if not weights:
        return torch.zeros(())
    return sum((w**2).sum() for w in weights)  # type: ignore[return-value]
