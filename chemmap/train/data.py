"""Training views of a dataset: flips and transposes, seeded augmentation, prefetching, sharding.

A *view* of a scan is the scan as one epoch of training sees it: flipped and/or transposed,
with a per-sample gain and offset and per-pixel noise, every random number drawn from a
seed of (run seed, sample, epoch). A view can be read whole or window by window, and a
window reads exactly the pixels the whole view has there (noise is drawn per fixed block
of the original scan, not per window), so patch-wise training sees the same image as
whole-image training and its gradient stays exact.

The dataset itself is read only through :class:`chemmap.preprocess.store.Dataset`: a view
reads :meth:`~chemmap.preprocess.store.Dataset.raw_window` and turns it into model input
with :meth:`~chemmap.preprocess.store.Dataset.model_input`, the function scoring uses too.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from chemmap.config import AugmentSection
from chemmap.preprocess.store import Dataset, PatchIndex

NOISE_BLOCK = 32  # px: the grid on which augmentation noise is seeded
# Bytes of whole scans one worker keeps in memory between epochs (:class:`InputCache`): the
# default pipeline's 150 training and validation scans take 460 MB; a paper-size scan alone
# is 750 MB, so large datasets are mostly read from the store every time, as before.
CACHE_BYTES = 1 << 30

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), end exclusive


@dataclass(frozen=True)
class Transform:
    """A geometric augmentation: optional transpose, then flips, on ``(..., H, W)`` arrays."""

    transpose: bool = False
    flip_y: bool = False
    flip_x: bool = False

    def shape(self, h: int, w: int) -> tuple[int, int]:
        """``(H, W)`` of the view of an ``(h, w)`` scan."""
        return (w, h) if self.transpose else (h, w)

    def apply(self, a: np.ndarray) -> np.ndarray:
        if self.transpose:
            a = np.swapaxes(a, -1, -2)
        if self.flip_y:
            a = a[..., ::-1, :]
        if self.flip_x:
            a = a[..., :, ::-1]
        return np.ascontiguousarray(a)

    def source_window(self, h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> Box:
        """The window of the original ``(h, w)`` scan that maps onto a window of the view."""
        vh, vw = self.shape(h, w)
        if self.flip_y:
            y0, y1 = vh - y1, vh - y0
        if self.flip_x:
            x0, x1 = vw - x1, vw - x0
        if self.transpose:
            y0, x0, y1, x1 = x0, y0, x1, y1
        return y0, x0, y1, x1

    def view_window(self, h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> Box:
        """The window of the view that a window of the original ``(h, w)`` scan maps onto.

        The inverse of :meth:`source_window`: windows that partition the scan's mask map onto
        windows that partition the view's mask.
        """
        if self.transpose:
            y0, x0, y1, x1 = x0, y0, x1, y1
        vh, vw = self.shape(h, w)
        if self.flip_y:
            y0, y1 = vh - y1, vh - y0
        if self.flip_x:
            x0, x1 = vw - x1, vw - x0
        return y0, x0, y1, x1


def seeded_rng(*key: int | str) -> np.random.Generator:
    """A generator seeded by a tuple of ints and strings, the same in every process.

    (``hash()`` of a string differs between processes; a digest of its ``repr`` does not.)
    """
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class InputCache:
    """Whole scans read once and kept for the epochs after, up to ``max_bytes``; thread-safe.

    Per scan, one of two arrays in the scan's orientation: its model input
    (:meth:`~chemmap.preprocess.store.Dataset.model_input` of the stored values, for views
    without gain, offset or noise: validation, and training with flips and transposes only),
    or its stored values (for views that augment them before the recipe). The recipe works
    pixel by pixel, so a window cut from the cached model input equals the recipe applied to
    that window (0 outside the scan, as there). Scans beyond the budget are read from the
    store every time. Reading a whole scan (zarr, then the recipe) cost 13-16 ms of the
    worker's CPU per 62 x 128 x 96 scan, a third of a training step.

    Args:
        data: the dataset.
        max_bytes: memory the cache may hold (default :data:`CACHE_BYTES`).
    """

    def __init__(self, data: Dataset, max_bytes: int = CACHE_BYTES) -> None:
        self.data = data
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._arrays: dict[tuple[str, bool], np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def whole(self, scan_id: str, plain: bool) -> np.ndarray | None:
        """The whole scan (read-only; see :meth:`window`), or None if it is over the budget."""
        key = (scan_id, plain)
        with self._lock:
            if key in self._arrays:
                return self._arrays[key]
        h, w = self.data.shape(scan_id)
        nbytes = self.data.n_channels * h * w * 4
        if self.nbytes + nbytes > self.max_bytes:
            return None
        a = self.data.raw_window(scan_id, 0, 0, h, w)  # (C, H, W)
        if plain:
            a = self.data.model_input(a)
        a.flags.writeable = False  # handed out as slices copied by :meth:`window` only
        with self._lock:
            if key not in self._arrays and self.nbytes + nbytes <= self.max_bytes:
                self._arrays[key] = a
                self.nbytes += nbytes
        return a

    def window(self, scan_id: str, y0: int, x0: int, y1: int, x1: int, plain: bool) -> np.ndarray:
        """A window ``(C, y1-y0, x1-x0)`` of the scan (its orientation; may reach outside it).

        ``plain``: the model input (0 outside the scan); otherwise the stored values (NaN
        outside, as :meth:`~chemmap.preprocess.store.Dataset.raw_window`). Always a new array.
        """
        whole = self.whole(scan_id, plain)
        if whole is None:
            raw = self.data.raw_window(scan_id, y0, x0, y1, x1)
            return self.data.model_input(raw) if plain else raw
        h, w = whole.shape[-2:]
        if (y0, x0, y1, x1) == (0, 0, h, w):
            return whole.copy()
        out = np.full((whole.shape[0], y1 - y0, x1 - x0), 0.0 if plain else np.nan, np.float32)
        ya, yb, xa, xb = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if ya < yb and xa < xb:
            out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = whole[:, ya:yb, xa:xb]
        return out

    def mask(self, scan_id: str) -> np.ndarray:
        """``(H, W)`` bool, the scan's sample mask (read once)."""
        with self._lock:
            m = self._masks.get(scan_id)
        if m is None:
            m = self.data.mask(scan_id)
            m.flags.writeable = False
            with self._lock:
                self._masks[scan_id] = m
        return m


class ScanView:
    """One scan as one epoch of training sees it (see the module docstring).

    Args:
        data: the dataset.
        scan_id: one of ``data.scan_ids``.
        transform: flips and transpose.
        gain, offset: ``x * gain + offset`` on the stored (physical-unit) values.
        noise: standard deviation of per-pixel Gaussian noise on the stored values.
        noise_key: seed of the noise blocks (run seed, sample, epoch, scan).
        cache: whole scans kept in memory (:class:`InputCache`); None reads the store.
    """

    def __init__(
        self,
        data: Dataset,
        scan_id: str,
        transform: Transform = Transform(),
        gain: float = 1.0,
        offset: float = 0.0,
        noise: float = 0.0,
        noise_key: tuple = (),
        cache: InputCache | None = None,
    ) -> None:
        self.data = data
        self.scan_id = scan_id
        self.transform = transform
        self.gain, self.offset, self.noise, self.noise_key = gain, offset, noise, noise_key
        self.cache = cache
        self.src_shape = data.shape(scan_id)
        self._mask: np.ndarray | None = None

    @property
    def plain(self) -> bool:
        """No gain, offset or noise: the view is the scan's model input, flipped or transposed."""
        return self.gain == 1.0 and self.offset == 0.0 and not self.noise > 0

    @property
    def hw(self) -> tuple[int, int]:
        return self.transform.shape(*self.src_shape)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the view: with ``__getitem__`` it reads like an array (for tiling)."""
        return (self.data.n_channels, *self.hw)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        *lead, ys, xs = key
        if any(s != slice(None) for s in lead) or ys.step not in (None, 1) or xs.step not in (None, 1):
            raise IndexError("a ScanView reads (:, y0:y1, x0:x1) windows only")
        h, w = self.hw
        y0, y1, _ = ys.indices(h)
        x0, x1, _ = xs.indices(w)
        return self.window(y0, x0, y1, x1)

    def mask(self) -> np.ndarray:
        """``(H, W)`` bool: the sample's pixels in the view."""
        if self._mask is None:
            m = self.cache.mask(self.scan_id) if self.cache is not None else self.data.mask(self.scan_id)
            self._mask = self.transform.apply(m)
            if self._mask is m:  # np.ascontiguousarray kept the cached array: the view owns a copy
                self._mask = m.copy()
        return self._mask

    def patch_windows(self, index: PatchIndex) -> list[Box]:
        """The dataset's patch-index core windows of this scan, in the view's coordinates.

        They partition the view's mask as the index's windows partition the scan's; their
        edges may leave the stride grid (a flip of an odd-sized scan):
        :func:`chemmap.models.tiling.plan_window` widens boxes to the grid itself.
        """
        windows = index.of_scan(self.data.scan_ids.index(self.scan_id))
        return [self.transform.view_window(*self.src_shape, *box) for box in windows]

    def _noise(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Noise for a window of the *original* scan, assembled from seeded fixed blocks."""
        c = self.data.n_channels
        out = np.zeros((c, y1 - y0, x1 - x0), np.float32)
        b = NOISE_BLOCK
        for by in range(y0 // b, (y1 - 1) // b + 1):
            for bx in range(x0 // b, (x1 - 1) // b + 1):
                blk = seeded_rng(*self.noise_key, by, bx).standard_normal((c, b, b), dtype=np.float32)
                ya, yb = max(y0, by * b), min(y1, (by + 1) * b)
                xa, xb = max(x0, bx * b), min(x1, (bx + 1) * b)
                out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = blk[
                    :, ya - by * b : yb - by * b, xa - bx * b : xb - bx * b
                ]
        return out * np.float32(self.noise)

    def raw_window(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Augmented stored values of a window of the view, in the *scan's* orientation.

        ``(C, h, w)`` of the source window (:meth:`Transform.source_window`); NaN outside the scan.
        """
        sy0, sx0, sy1, sx1 = self.transform.source_window(*self.src_shape, y0, x0, y1, x1)
        if self.cache is not None:
            x = self.cache.window(self.scan_id, sy0, sx0, sy1, sx1, plain=False)
        else:
            x = self.data.raw_window(self.scan_id, sy0, sx0, sy1, sx1)
        if self.gain != 1.0 or self.offset != 0.0:
            x = x * np.float32(self.gain) + np.float32(self.offset)
        if self.noise > 0:
            x = x + self._noise(sy0, sx0, sy1, sx1)
        return x

    def window(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Model input for a window of the view, ``(C, y1-y0, x1-x0)``; 0 outside the scan."""
        if self.cache is not None and self.plain:
            box = self.transform.source_window(*self.src_shape, y0, x0, y1, x1)
            cached = self.cache.whole(self.scan_id, plain=True)
            if cached is not None and box == (0, 0, *self.src_shape):  # a whole view: one copy, flipped
                out = self.transform.apply(cached)
                return out if out is not cached else cached.copy()
            return self.transform.apply(self.cache.window(self.scan_id, *box, plain=True))
        return self.transform.apply(self.data.model_input(self.raw_window(y0, x0, y1, x1)))

    def full(self) -> np.ndarray:
        """Model input of the whole view, ``(C, H, W)``."""
        h, w = self.hw
        return self.window(0, 0, h, w)


def sample_views(
    data: Dataset,
    sample_id: str,
    epoch: int,
    seed: int,
    augment: AugmentSection | None,
    cache: InputCache | None = None,
) -> list[ScanView]:
    """The views of a sample's scans for one epoch (no augmentation when ``augment`` is None).

    ``cache``: whole scans kept in memory between epochs (:class:`InputCache`); the views
    read the same values with or without it.
    """
    info = data.samples[sample_id]
    if augment is None:
        return [ScanView(data, s, cache=cache) for s in info.scans]
    rng = seeded_rng(seed, sample_id, epoch)
    views = []
    for s in info.scans:
        t = Transform(
            transpose=bool(augment.rot90 and rng.integers(2)),
            flip_y=bool(augment.flips and rng.integers(2)),
            flip_x=bool(augment.flips and rng.integers(2)),
        )
        gain = float(1.0 + augment.scatter_mult * rng.standard_normal()) if augment.scatter_mult else 1.0
        offset = float(augment.scatter_add * rng.standard_normal()) if augment.scatter_add else 0.0
        views.append(ScanView(data, s, t, gain, offset, augment.noise, (seed, sample_id, epoch, s), cache))
    return views


class Prefetcher:
    """Runs ``load(item)`` for upcoming items in a background thread, ``depth`` ahead.

    Zarr reads release the GIL, so the next sample is read while the model computes.
    """

    def __init__(self, items: Sequence[Any], load: Callable[[Any], Any], depth: int = 2) -> None:
        self.items, self.load, self.depth = list(items), load, depth

    def _work(self, q: queue.Queue, stop: threading.Event) -> None:
        for it in self.items:
            if stop.is_set():
                return
            try:
                q.put((True, self.load(it)))
            except BaseException as err:  # handed to the consumer, raised there
                q.put((False, err))
                return
        q.put((True, StopIteration))

    def __iter__(self) -> Iterator[Any]:
        if self.depth <= 0:
            for it in self.items:
                yield self.load(it)
            return
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        threading.Thread(target=self._work, args=(q, stop), daemon=True).start()
        try:
            while True:
                ok, val = q.get()
                if not ok:
                    raise val
                if val is StopIteration:
                    return
                yield val
        finally:
            stop.set()


def shard_for_rank(
    ids: Sequence[str], rank: int, world: int, batch: int, rng_seed: int | None
) -> tuple[list[tuple[str, float]], int]:
    """Shuffle (optionally), pad and shard sample ids so every rank gets the same number of steps.

    Returns ``(items, steps)`` where ``items`` is a list of ``(sample_id, weight)`` for this rank,
    ``weight`` 0 for padding (a repeated sample that contributes no gradient, so that DDP's
    collective calls line up on every rank without counting any sample twice).
    """
    ids = list(ids)
    if rng_seed is not None:
        ids = [ids[i] for i in np.random.default_rng(rng_seed).permutation(len(ids))]
    per_step = world * batch
    steps = max(1, -(-len(ids) // per_step))
    padded = [(s, 1.0) for s in ids] + [(ids[i % len(ids)], 0.0) for i in range(steps * per_step - len(ids))]
    return padded[rank::world], steps
