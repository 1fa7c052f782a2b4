"""Sample masks: the threshold mask's clean-up steps and mask files, with known answers."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from chemmap.config import MaskConfig
from chemmap.errors import InputError
from chemmap.preprocess.mask import read_mask_file, threshold_mask


def test_threshold_mask_cleans_specks_and_edges():
    refl = np.full((40, 40), 0.05, np.float32)
    refl[8:32, 10:30] = 0.6  # the sample
    refl[20, 20] = 0.1  # a dark spot inside: filled
    refl[2, 2] = 0.9  # a speck of glare on the belt: opened away
    m = threshold_mask(refl, MaskConfig(opening=1, erode=1, min_size=16))
    assert m[20, 20] and not m[2, 2]
    assert not m[8, 15] and m[9, 15]  # the edge row is eroded
    assert m.sum() == 22 * 18


def test_each_clean_up_step_can_be_switched_off():
    refl = np.full((30, 30), 0.05, np.float32)
    refl[5:25, 5:25] = 0.6
    refl[15, 15] = 0.1  # a hole
    refl[1, 1] = 0.9  # a speck
    raw = threshold_mask(refl, MaskConfig(opening=0, erode=0, fill_holes=False, min_size=1))
    assert raw.sum() == 20 * 20 - 1 + 1 and not raw[15, 15] and raw[1, 1]
    filled = threshold_mask(refl, MaskConfig(opening=0, erode=0, fill_holes=True, min_size=1))
    assert filled[15, 15] and filled.sum() == 20 * 20 + 1
    big_only = threshold_mask(refl, MaskConfig(opening=0, erode=0, fill_holes=True, min_size=2))
    assert not big_only[1, 1] and big_only.sum() == 20 * 20


def test_mask_files_npy_and_png(tmp_path):
    m = np.zeros((6, 5), bool)
    m[1:4, 2:4] = True
    np.save(tmp_path / "m.npy", m)
    assert (read_mask_file(tmp_path / "m.npy", (6, 5)) == m).all()
    mpimg.imsave(tmp_path / "m.png", m.astype(np.float32), cmap="gray")
    assert (read_mask_file(tmp_path / "m.png", (6, 5)) == m).all()


def test_bad_mask_files_are_one_line_naming_the_file(tmp_path):
    np.save(tmp_path / "m.npy", np.ones((3, 3)))
    with pytest.raises(InputError, match=r"m\.npy: mask is 3x3, the scan is 4x4"):
        read_mask_file(tmp_path / "m.npy", (4, 4))
    with pytest.raises(InputError, match="mask file not found"):
        read_mask_file(tmp_path / "none.npy", (4, 4))
    (tmp_path / "m.tif").write_bytes(b"x")
    with pytest.raises(InputError, match=r"m\.tif: mask files must be \.npy or \.png"):
        read_mask_file(tmp_path / "m.tif", (4, 4))
