"""The paper's loss, term by term, against hand-computed values (DESIGN.md "Loss")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from chemmap.models.loss import (
    LossConfig,
    Smoothness,
    l2_penalty,
    mean_term,
    out_of_range_term,
    sample_loss,
    smooth_term,
)
from chemmap.models.unet import UNet

# One sample, one target, 3 x 3 map; the mask leaves out the bottom-right corner. Every
# expected value below is a small integer or a dyadic fraction, exact in float32 whatever
# the order of summation: the terms must equal them exactly.
P = torch.tensor([[10.0, 12.0, -3.0], [11.0, 104.0, 9.0], [8.0, 7.0, 50.0]])[None, None]  # (1, 1, 3, 3)
M = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])[None]  # (1, 3, 3)
N = 8.0


def test_defaults_are_the_papers_weights() -> None:
    assert LossConfig() == LossConfig(mean=1.0, smooth=20.0, out_of_range=1e-3, l2=1e-3)


def test_mean_term() -> None:
    mean = (10 + 12 - 3 + 11 + 104 + 9 + 8 + 7) / N  # the 50 outside the mask is ignored
    assert mean_term(P, M, torch.tensor([[20.0]])).item() == (20.0 - mean) ** 2


def test_smoothness_counts_in_mask_pairs_along_x_and_y_divided_by_n() -> None:
    horizontal = (12 - 10) ** 2 + (-3 - 12) ** 2 + (104 - 11) ** 2 + (9 - 104) ** 2 + (7 - 8) ** 2
    vertical = (11 - 10) ** 2 + (8 - 11) ** 2 + (104 - 12) ** 2 + (7 - 104) ** 2 + (9 + 3) ** 2
    # (50 - 7) and (50 - 9) involve the masked-out pixel: not counted.
    assert smooth_term(P, M).item() == (horizontal + vertical) / N


def test_out_of_range_is_a_sum_inside_the_mask() -> None:
    assert out_of_range_term(P, M).item() == 3.0**2 + 4.0**2
    big = P.repeat(1, 1, 2, 2)  # twice the size: the term doubles (a sum, not a mean)
    assert out_of_range_term(big, M.repeat(1, 2, 2)).item() == 4 * (3.0**2 + 4.0**2)


def test_total_weights_terms_sums_targets_and_averages_the_batch() -> None:
    torch.manual_seed(0)
    p = torch.randn(3, 2, 9, 11, dtype=torch.float64) * 30 + 40  # (B, T, H, W)
    mask = (torch.rand(3, 9, 11) > 0.3).double()
    y = torch.tensor([[30.0, 10.0], [35.0, float("nan")], [50.0, 12.0]], dtype=torch.float64)  # no protein
    cfg = LossConfig(mean=1.0, smooth=2.0, out_of_range=0.5)
    terms = sample_loss(p, mask, y, cfg)
    per_sample = []
    for b in range(3):
        total = 0.0
        for t in range(2):
            pb, mb = p[b : b + 1, t : t + 1], mask[b : b + 1]
            if not math.isnan(y[b, t]):
                total += mean_term(pb, mb, y[b : b + 1, t : t + 1]).item()
            total += 2.0 * smooth_term(pb, mb).item() + 0.5 * out_of_range_term(pb, mb).item()
        per_sample.append(total)
    # The same sums in another order: rounding only, ~eps per sum in float64 (bound 1000 eps).
    assert terms["total"].item() == pytest.approx(
        sum(per_sample) / 3, rel=1000 * torch.finfo(torch.float64).eps
    )
    assert set(terms) == {"mean", "smooth", "out_of_range", "total"}


def test_a_mask_of_another_size_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"mask shape \(1, 30, 34\) does not match predictions"):
        smooth_term(torch.zeros(1, 1, 10, 10), torch.ones(1, 30, 34))


def test_empty_mask_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"empty sample mask for batch element\(s\) \[1\]"):
        mask = torch.stack([torch.ones(4, 4), torch.zeros(4, 4)])
        mean_term(torch.zeros(2, 1, 4, 4), mask, torch.zeros(2, 1))


def test_l2_counts_conv_weights_only() -> None:
    model = UNet(in_channels=9, depth=2, features=3, normalization="ln", front_end=True, bilinear=False)
    expected = sum(
        (m.weight**2).sum()
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Conv3d)
    )
    assert l2_penalty(model).item() == pytest.approx(expected.item())
    everything = sum((p**2).sum() for p in model.parameters())
    assert l2_penalty(model).item() < everything.item()  # biases and LayerNorm weights left out


# ----------------------------------------------------------------------------- the smoothness's forms


def _pairs(anchor: bool) -> list[int]:
    """Neighbour differences of P counted with both pixels in M, or with the anchor in M."""
    horizontal = [12 - 10, -3 - 12, 104 - 11, 9 - 104, 7 - 8]  # both in the mask
    vertical = [11 - 10, 8 - 11, 104 - 12, 7 - 104, 9 + 3]
    if anchor:  # the anchor (left or upper pixel) in the mask, the other out: 7 -> 50, 9 -> 50
        horizontal.append(50 - 7)
        vertical.append(50 - 9)
    return horizontal + vertical


@pytest.mark.parametrize("anchor", [False, True])
def test_the_paper_counts_a_pair_by_its_anchor_pixel(anchor: bool) -> None:
    cfg = Smoothness(pairs="anchor" if anchor else "both")
    assert smooth_term(P, M, cfg).item() == sum(d**2 for d in _pairs(anchor)) / N


def test_huber_is_quadratic_up_to_delta_and_linear_beyond() -> None:
    delta = 4.0
    expected = sum(d**2 if abs(d) <= delta else 2 * delta * abs(d) - delta**2 for d in _pairs(False)) / N
    assert smooth_term(P, M, Smoothness(penalty="huber", delta=delta)).item() == expected
    # TV: 2 delta |d|, meeting Huber's linear part (the same slope)
    assert (
        smooth_term(P, M, Smoothness(penalty="tv", delta=delta)).item()
        == sum(2 * delta * abs(d) for d in _pairs(False)) / N
    )


def test_a_fat_lean_edge_costs_its_contrast_under_huber_and_its_square_under_the_paper() -> None:
    """Doubling an edge's contrast quadruples the paper's penalty and only doubles Huber's."""
    edge = torch.zeros(1, 1, 4, 4)
    edge[..., 2:] = 40.0
    mask = torch.ones(1, 4, 4)
    quad = [smooth_term(edge * k, mask).item() for k in (1, 2)]
    hub = [smooth_term(edge * k, mask, Smoothness(penalty="huber", delta=1.0)).item() for k in (1, 2)]
    assert quad[1] == pytest.approx(4 * quad[0])
    assert hub[1] == pytest.approx(2 * hub[0], rel=0.02)


def test_sample_loss_takes_the_smoothness_form_from_the_config() -> None:
    y = torch.tensor([[20.0]])
    cfg = LossConfig(smooth=1.0, smooth_penalty="huber", smooth_delta=4.0, smooth_pairs="anchor")
    got = sample_loss(P, M, y, cfg)["smooth"].item()
    assert got == smooth_term(P, M, Smoothness(penalty="huber", delta=4.0, pairs="anchor")).item()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"penalty": "l1"}, "penalty must be one of"), ({"pairs": "one"}, "pairs must be one of"),
     ({"delta": 0.0}, "delta must be > 0")],
)  # fmt: skip
def test_a_bad_smoothness_is_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Smoothness(**kwargs)


def test_the_mask_on_the_output_grid_keeps_blocks_at_least_half_inside() -> None:
    """2 x 2 blocks: 3 of 4 and 2 of 4 are in, 1 of 4 is out; a border block of an odd size
    counts only the pixels that exist (1 of 1 in, 1 of 2 in, 0 of 2 out)."""
    from chemmap.models.loss import output_grid_mask

    m = torch.tensor(
        [
            [1, 1, 1, 0, 1, 0, 1],
            [1, 0, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    want = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(output_grid_mask(m), want)
    batch = torch.stack([m, ~m])  # leading dimensions kept
    assert output_grid_mask(batch).shape == (2, 2, 4)
    assert torch.equal(output_grid_mask(batch)[0], want)
    with pytest.raises(ValueError, match="2 dimensions"):
        output_grid_mask(torch.ones(5, dtype=torch.bool))
