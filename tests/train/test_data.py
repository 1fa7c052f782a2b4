"""Training views: a window of a view is that slice of the whole view, read through the dataset.

The dataset is a small ``dataset.zarr`` written here from seeded arrays (odd sizes, a sample
of two scans) with the production patch-index writer, and read with the production reader.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chemmap.config import AugmentSection, LossSection, PreprocessConfig
from chemmap.models.tiling import model_geometry
from chemmap.models.unet import UNet, UNetConfig
from chemmap.preprocess.dataset import PatchGeometry, write_patch_index
from chemmap.preprocess.recipe import Recipe
from chemmap.preprocess.store import Dataset
from chemmap.train.data import (
    NOISE_BLOCK,
    InputCache,
    Prefetcher,
    ScanView,
    Transform,
    sample_views,
    seeded_rng,
    shard_for_rank,
)
from chemmap.train.loop import PatchPlan, forward_map, sample_backward_by_patches
from chemmap.train.objective import sample_loss, scan_sums

ROOT = Path(__file__).resolve().parents[2]
CHANNELS = 3
SCANS = {"a1": ("a", 37, 29), "a2": ("a", 23, 41), "b1": ("b", 30, 34)}  # scan: (sample, lines, samples)
TRANSFORMS = [Transform(t, fy, fx) for t, fy, fx in itertools.product((False, True), repeat=3)]
MODEL = UNetConfig(in_channels=CHANNELS, out_channels=1, depth=2, features=2)
CORE = 6  # px, a multiple of the model's stride (2): many windows, clipped ones at odd edges


def _mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An ellipse with a ragged edge: windows at the edge hold only a few sample pixels."""
    yy, xx = np.mgrid[:h, :w]
    r = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2
    return (r + 0.15 * rng.random((h, w))) < 1.0


def _write_dataset(path, rng: np.random.Generator) -> None:
    import zarr

    wl = np.linspace(900.0, 1000.0, CHANNELS)
    recipe = Recipe(
        PreprocessConfig(),
        tuple(wl),
        tuple(range(CHANNELS)),
        tuple(wl),
        mean=(0.3, 0.5, 0.7),
        std=(0.1, 0.2, 0.05),
    )
    root = zarr.open_group(str(path), mode="w")
    for scan_id, (_, h, w) in SCANS.items():
        g = root.create_group(f"scans/{scan_id}")
        g.create_array("cube", shape=(CHANNELS, h, w), dtype="float32")[...] = rng.random(
            (CHANNELS, h, w), dtype=np.float32
        )
        g.create_array("mask", shape=(h, w), dtype="bool")[...] = _mask(rng, h, w)
    samples = {"a": [12.5, ["a1", "a2"]], "b": [30.0, ["b1"]]}
    root.attrs.update(
        {
            "recipe": recipe.to_dict(),
            "targets": ["fat"],
            "samples": [
                {"sample_id": s, "split": i + 1, "targets": [y], "scans": scans}
                for i, (s, (y, scans)) in enumerate(samples.items())
            ],
            "scans": [{"scan_id": s, "sample_id": sample} for s, (sample, _, _) in SCANS.items()],
        }
    )
    g = model_geometry(UNet(MODEL))
    write_patch_index(path, PatchGeometry.on_grid(CORE, g.radius, g.stride))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Dataset:
    path = tmp_path_factory.mktemp("views") / "dataset.zarr"
    _write_dataset(path, np.random.default_rng(20261101))
    return Dataset(path)


def _boxes(h: int, w: int, rng: np.random.Generator, n: int = 12):
    """Odd windows: inside, across the border, off the stride and noise grids."""
    out = [(0, 0, h, w), (1, 3, h - 2, w - 1), (-3, -5, 7, 9), (h - 5, w - 3, h + 4, w + 2)]
    for _ in range(n):
        y0, x0 = int(rng.integers(-4, h)), int(rng.integers(-4, w))
        out.append((y0, x0, y0 + int(rng.integers(1, 20)), x0 + int(rng.integers(1, 20))))
    return out


def _expected_slice(full: np.ndarray, box) -> np.ndarray:
    """``full[:, y0:y1, x0:x1]`` with zeros outside the view (model input outside the scan is 0)."""
    y0, x0, y1, x1 = box
    _, h, w = full.shape
    out = np.zeros((full.shape[0], y1 - y0, x1 - x0), np.float32)
    ya, yb, xa, xb = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if ya < yb and xa < xb:
        out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = full[:, ya:yb, xa:xb]
    return out


def test_view_window_inverts_source_window():
    rng = np.random.default_rng(1)
    for t in TRANSFORMS:
        for box in _boxes(37, 29, rng):
            assert t.source_window(37, 29, *t.view_window(37, 29, *box)) == box
            assert t.view_window(37, 29, *t.source_window(37, 29, *box)) == box


@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
def test_a_window_of_an_augmented_view_is_that_slice_of_the_whole_view(data, transform):
    # Noise blocks of 32 px: the scans (up to 41 px) span several, and windows cross their seams.
    assert max(max(h, w) for _, h, w in SCANS.values()) > NOISE_BLOCK
    rng = np.random.default_rng(2)
    for scan_id in SCANS:
        view = ScanView(data, scan_id, transform, gain=1.1, offset=-0.02, noise=0.05, noise_key=(7, scan_id))
        full = view.full()
        assert full.shape == view.shape
        for box in _boxes(*view.hw, rng):
            np.testing.assert_array_equal(view.window(*box), _expected_slice(full, box), err_msg=str(box))
        np.testing.assert_array_equal(view.mask(), transform.apply(data.mask(scan_id)))


def test_views_read_through_the_dataset_model_input(data):
    rng = np.random.default_rng(3)
    h, w = data.shape("a2")
    for box in _boxes(h, w, rng):
        expected = data.model_input(data.raw_window("a2", *box))
        np.testing.assert_array_equal(ScanView(data, "a2").window(*box), expected)
    for t in TRANSFORMS:
        view = ScanView(data, "a2", t, gain=0.9, offset=0.01)
        for box in _boxes(*view.hw, rng, n=4):
            raw = data.raw_window("a2", *t.source_window(h, w, *box))
            expected = t.apply(data.model_input(raw * np.float32(0.9) + np.float32(0.01)))
            np.testing.assert_array_equal(view.window(*box), expected)


@pytest.mark.parametrize(
    ("budget", "arrays"),
    [(1 << 30, 6), (0, 0), (CHANNELS * 37 * 29 * 4, 1)],  # every scan's two arrays; none; the first read
    ids=["all", "none", "one scan"],
)
def test_views_read_the_same_values_through_the_input_cache(data, budget, arrays):
    """Whole views, windows across the border and masks: equal, bit for bit, with or without the cache.

    Plain views (flips and transposes only) come from the cached model input; augmented ones
    (gain, offset, noise) from the cached stored values; over the budget, from the store.
    """
    cache = InputCache(data, max_bytes=budget)
    rng = np.random.default_rng(4)
    for _ in range(2):  # the second pass reads what the first one cached
        for scan_id in SCANS:
            for t in TRANSFORMS:
                for augment in ({}, {"gain": 1.1, "offset": -0.02, "noise": 0.05, "noise_key": (7, scan_id)}):
                    ref, got = (
                        ScanView(data, scan_id, t, **augment),
                        ScanView(data, scan_id, t, **augment, cache=cache),
                    )
                    np.testing.assert_array_equal(got.full(), ref.full())
                    np.testing.assert_array_equal(got.mask(), ref.mask())
                    for box in _boxes(*ref.hw, rng, n=3):
                        np.testing.assert_array_equal(got.window(*box), ref.window(*box), err_msg=str(box))
                    got.full()[...] = 0  # a caller writing into what it got leaves the cache alone
                    got.mask()[...] = False
    assert cache.nbytes <= budget and len(cache._arrays) == arrays


@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
def test_patch_windows_partition_the_view_mask(data, transform):
    index = data.patch_index()
    for scan_id in SCANS:
        view = ScanView(data, scan_id, transform)
        count = np.zeros(view.hw, np.int32)
        for y0, x0, y1, x1 in view.patch_windows(index):
            assert 0 <= y0 < y1 <= view.hw[0] and 0 <= x0 < x1 <= view.hw[1]
            count[y0:y1, x0:x1] += 1
        mask = view.mask()
        assert (count[mask] == 1).all()
        assert len(view.patch_windows(index)) == len(index.of_scan(data.scan_ids.index(scan_id)))


def test_patch_gradient_of_an_augmented_sample_equals_the_whole_image_gradient(data):
    """Sample "a" (two scans of odd sizes), flipped/transposed and noisy, patch by patch vs whole."""
    torch.manual_seed(0)
    net = UNet(MODEL).double()
    index = data.patch_index()
    plan = PatchPlan(index, index.halo, model_geometry(net))
    assert index.halo >= plan.geometry.radius
    augment = AugmentSection(flips=True, rot90=True, scatter_mult=0.05, scatter_add=0.01, noise=0.02)
    views = sample_views(data, "a", epoch=3, seed=0, augment=augment)
    assert {v.transform for v in views} != {Transform()}  # something is flipped or transposed
    loss_w = LossSection(mean=1.0, smooth=1.0, out_of_range=1e-3, l2=0.0)
    y = torch.tensor(data.samples["a"].targets, dtype=torch.float64)

    net.zero_grad()
    parts = [
        scan_sums(forward_map(net, torch.from_numpy(v.full())), torch.from_numpy(v.mask())) for v in views
    ]
    whole = sample_loss(parts, y, loss_w)
    whole["loss"].backward()
    expected = [p.grad.clone() for p in net.parameters()]

    net.zero_grad()
    terms = sample_backward_by_patches(net, net, views, y, loss_w, plan, scale=1.0)
    assert terms["total"] == pytest.approx(float(whole["loss"].detach()), rel=1e-9)
    for p, g in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)


def test_sample_views_are_seeded_per_sample_and_epoch(data):
    augment = AugmentSection(flips=True, rot90=True, noise=0.05, scatter_mult=0.1)

    def read(epoch: int, seed: int = 0):
        return [
            (v.transform, v.gain, v.window(0, 0, 5, 5)) for v in sample_views(data, "a", epoch, seed, augment)
        ]

    def same(p, q) -> bool:
        return all(a[:2] == b[:2] and np.array_equal(a[2], b[2]) for a, b in zip(p, q, strict=True))

    assert same(read(4), read(4))  # a repeated pass over a sample sees the same input
    assert not same(read(4), read(5)) and not same(read(4), read(4, seed=1))
    plain = sample_views(data, "a", 4, 0, None)
    assert [v.transform for v in plain] == [Transform(), Transform()] and plain[0].gain == 1.0


def test_seeds_are_the_same_in_every_process():
    """Workers are separate processes: a seed from ``hash()`` of a string would differ between them."""
    code = "from chemmap.train.data import seeded_rng; print(seeded_rng(3, 'sample-7', 2).integers(1 << 30))"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(h), "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        ).stdout.strip()
        for h in (1, 2)
    }
    assert runs == {str(seeded_rng(3, "sample-7", 2).integers(1 << 30))}


@pytest.mark.parametrize(("n", "world", "batch"), [(7, 2, 1), (5, 3, 2), (2, 2, 1), (1, 2, 3)])
def test_shards_give_every_rank_the_same_steps_and_every_sample_once(n, world, batch):
    ids = [f"s{i}" for i in range(n)]
    shards = [shard_for_rank(ids, r, world, batch, rng_seed=5) for r in range(world)]
    steps = {s for _, s in shards}
    assert steps == {math.ceil(n / (world * batch))}
    assert {len(items) for items, _ in shards} == {shards[0][1] * batch}
    counted = sorted(sid for items, _ in shards for sid, w in items if w == 1.0)
    assert counted == sorted(ids)


def test_prefetcher_keeps_order_and_raises_a_loader_error_in_the_consumer():
    assert list(Prefetcher(range(10), lambda i: i * i, depth=3)) == [i * i for i in range(10)]
    assert list(Prefetcher(range(4), str, depth=0)) == ["0", "1", "2", "3"]

    def load(i: int) -> int:
        if i == 2:
            raise KeyError("sample 2 is unreadable")
        return i

    with pytest.raises(KeyError, match="sample 2"):
        list(Prefetcher(range(5), load, depth=2))
