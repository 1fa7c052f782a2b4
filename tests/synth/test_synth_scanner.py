"""The synthetic scanner: layout, headers, determinism, lab values, splits, atomic writing, config."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from chemmap.config import SynthConfig
from chemmap.errors import ConfigError, InputError
from chemmap.io import assign_splits
from chemmap.io.references import shuffled_splits
from chemmap.synth import SynthSpec, scanner, synthesize
from chemmap.synth import physics as ph

SMALL = SynthSpec(n_samples=12, lines=32, samples=24, bands=40, seed=3)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _refs(root: Path) -> list[dict[str, str]]:
    with open(root / "references.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth") / "data", SMALL, progress=False)


def test_layout_and_headers_read_by_spectral(small: Path) -> None:
    import spectral.io.envi as envi

    rows = _refs(small)
    assert len(rows) == SMALL.n_samples
    for r in rows:
        sid = r["scan_id"]
        cap = small / sid / "capture"
        for name, lines in (
            (sid, SMALL.lines),
            (f"WHITEREF_{sid}", ph.REF_LINES),
            (f"DARKREF_{sid}", ph.REF_LINES),
        ):
            img = envi.open(str(cap / f"{name}.hdr"), str(cap / f"{name}.raw"))
            assert img.shape == (lines, SMALL.samples, SMALL.bands)
            assert img.metadata["interleave"] == "bil"
            assert int(img.metadata["ceiling"]) == 4095
            assert np.dtype(img.dtype) == np.uint16
            wl = np.asarray(img.metadata["wavelength"], float)
            # The header holds the band centres with 3 decimals.
            np.testing.assert_array_equal(
                wl, [float(f"{w:.3f}") for w in np.linspace(400, 1000, SMALL.bands)]
            )
        assert (small / "truth" / f"{sid}.npz").is_file()
    rec = json.loads((small / "_SUCCESS.json").read_text())
    assert rec["spec"] == SMALL.to_json() and rec["scans"] == SMALL.n_samples
    assert not list(small.parent.glob("*.synth-tmp"))


def test_counts_white_dark_and_saturation(small: Path) -> None:
    sid = _refs(small)[0]["scan_id"]
    cap = small / sid / "capture"
    shape = (SMALL.lines, SMALL.bands, SMALL.samples)  # BIL file order
    raw = np.fromfile(cap / f"{sid}.raw", "<u2").reshape(shape)
    white = np.fromfile(cap / f"WHITEREF_{sid}.raw", "<u2").reshape(ph.REF_LINES, SMALL.bands, SMALL.samples)
    dark = np.fromfile(cap / f"DARKREF_{sid}.raw", "<u2").reshape(ph.REF_LINES, SMALL.bands, SMALL.samples)
    assert raw.max() <= 4095 and white.max() <= 4095
    assert (raw == 4095).any(axis=1).sum() >= 1  # hot pixels (and glare on fat) saturate
    span = white.mean(0).astype(float) - dark.mean(0)
    dead = span < 20
    assert 1 <= dead.all(axis=0).sum() <= 2  # a dead detector column
    assert np.median(span[~dead]) > 100
    with np.load(small / "truth" / f"{sid}.npz") as t:
        mask = t["mask"]
    refl = ((raw.astype(float) - dark.mean(0)[None]) / np.where(dead, 1, span)[None]).mean(axis=1)
    live = ~dead.any(axis=0)[None, :] & ~(raw == 4095).any(axis=1)
    assert np.median(refl[~mask & live]) < 0.08  # dark belt
    assert np.median(refl[mask & live]) > 0.2  # bright meat: a 0.15 threshold separates them


def test_truth_and_references_agree(small: Path) -> None:
    rows = _refs(small)
    fats = []
    for r in rows:
        with np.load(small / "truth" / f"{r['scan_id']}.npz") as t:
            m = t["mask"]
            assert t["fat"].dtype == np.float32 and m.dtype == bool
            assert np.isnan(t["fat"][~m]).all() and np.isfinite(t["fat"][m]).all()
            assert 0.25 < m.mean() < 0.8
            # Fat between the leanest lean and the fattest adipose tissue; in pure meat pixels
            # (no rind, no membrane) the fat-free rest is split by the animal's water share.
            fat, water, protein = t["fat"][m], t["water"][m], t["protein"][m]
            assert (
                ph.LEAN_FAT_RANGE_PCT[0] - 1e-4 <= fat.min()
                and fat.max() <= ph.ADIPOSE_FAT_RANGE_PCT[1] + 1e-4
            )
            np.testing.assert_allclose(fat + water + protein, 100 - ph.ASH_PCT, rtol=1e-5)
            i = int(r["sample_id"][-4:])
            scene = _scene(i)
            meat = m & (scene.rind == 0) & (scene.membrane == 0)
            water_share = scanner._sample(SMALL, i).tissues.water_share
            np.testing.assert_allclose(
                t["water"][meat] / (t["water"][meat] + t["protein"][meat]), water_share, rtol=1e-5
            )
            # The lab value is the whole sample's: the surface mean plus a surface-to-bulk difference.
            spread = {"fat": np.hypot(ph.LAB_SD_FAT_PCT, ph.SURFACE_TO_BULK_SD_FAT_PCT)}
            for k in ("fat", "protein", "water"):
                sd = spread.get(k, getattr(ph, f"LAB_SD_{k.upper()}_PCT") + ph.SURFACE_TO_BULK_SD_FAT_PCT)
                assert abs(float(r[k]) - float(t[k][m].mean())) < 5 * sd
            fats.append(float(t["fat"][m].mean()))
    assert 5 < min(fats) and max(fats) < 70 and np.std(fats) > 5


def _scene(i: int, j: int = 0):
    """Scan ``(i, j)`` of ``SMALL``'s scene, drawn again as the scanner draws it."""
    smp = scanner._sample(SMALL, i)
    rng = scanner._rng(SMALL.seed, scanner._SCENE, i, j)
    return scanner.make_scene(rng, SMALL.lines, SMALL.samples, smp.side_fat[j], smp.tissues)


def test_tissues_vary_between_and_within_bellies_and_bright_tissue_is_not_all_fat(small: Path) -> None:
    tissues = [scanner._sample(SMALL, i).tissues for i in range(SMALL.n_samples)]
    assert np.std([t.adipose_fat for t in tissues]) > 1.0
    assert np.std([t.lean_fat for t in tissues]) > 0.2
    scenes = [_scene(i) for i in range(SMALL.n_samples)]
    for sc in scenes:
        np.testing.assert_allclose(sc.lean + sc.adipose + sc.rind + sc.membrane, 1.0, atol=1e-5)
        assert 0.5 < sc.pitch_mm < 50
    assert sum(float(sc.rind[sc.mask].sum()) > 0 for sc in scenes) >= SMALL.n_samples // 2
    assert all(float(sc.membrane[sc.mask].sum()) > 0 for sc in scenes)
    # Within one belly, pure adipose pixels differ in fat (the lipid content varies over it).
    sc = max(scenes, key=lambda x: float((x.adipose > 0.99).sum()))
    assert np.ptp(sc.fat[sc.adipose > 0.99]) > 1.0
    # Rind is bright (strong scatter) and low in fat.
    assert ph.SCATTER_M_RIND > ph.SCATTER_M_LEAN and ph.RIND_FAT_PCT < 20


def test_lab_values_are_the_bulk_not_the_surface(small: Path) -> None:
    rows = _refs(small)
    surface = []
    for r in rows:
        with np.load(small / "truth" / f"{r['scan_id']}.npz") as t:
            surface.append(float(t["fat"][t["mask"]].mean()))
    diff = np.array([float(r["fat"]) for r in rows]) - np.array(surface)
    # lab - surface = surface-to-bulk difference + lab error: wider than lab error alone
    assert diff.std() > 1.2 * ph.LAB_SD_FAT_PCT


def test_the_scanner_version_is_in_the_synth_key() -> None:
    from chemmap.config import load_config
    from chemmap.pipeline import scanner_inputs, synth_dir
    from chemmap.stages import stage_dir

    assert scanner.SYNTH_VERSION == 2
    cfg = load_config(Path(__file__).parents[2] / "pipelines" / "pork_belly.yaml")
    section = cfg.synth.model_dump(mode="json")
    v1 = stage_dir(cfg.workdir_path, "synth", section, scanner_inputs(1))
    v2 = stage_dir(cfg.workdir_path, "synth", section, scanner_inputs(2))
    assert v1.key != v2.key
    assert synth_dir(cfg).key == v2.key


def test_splits_follow_the_one_rule(small: Path) -> None:
    """The scanner's split column is chemmap's split rule (chemmap.io.references) for its seed."""
    rows = _refs(small)
    assert [r["sample_id"] for r in rows] == [f"belly{i:04d}" for i in range(SMALL.n_samples)]
    split = [int(r["split"]) for r in rows]
    assert split == shuffled_splits(SMALL.n_samples, seed=SMALL.seed).tolist()
    assert {r["sample_id"]: int(r["split"]) for r in rows} == assign_splits(
        [r["sample_id"] for r in rows], seed=SMALL.seed
    )
    assert sorted(split) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_scans_per_sample_share_lab_values_and_split(tmp_path: Path) -> None:
    spec = SynthSpec(n_samples=6, lines=24, samples=20, bands=16, scans_per_sample=2, seed=1)
    root = synthesize(tmp_path / "d", spec, progress=False)
    rows = _refs(root)
    assert len(rows) == 12
    by_sample: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_sample.setdefault(r["sample_id"], []).append(r)
    for scans in by_sample.values():
        assert len(scans) == 2
        assert {(s["fat"], s["protein"], s["water"], s["split"]) for s in scans}.__len__() == 1
        # the lab fat is the mean over both scans' masked pixels (plus the bulk's difference and lab error)
        vals, n = 0.0, 0
        for s in scans:
            with np.load(root / "truth" / f"{s['scan_id']}.npz") as t:
                vals += float(np.nansum(t["fat"]))
                n += int(t["mask"].sum())
        assert abs(float(scans[0]["fat"]) - vals / n) < 5 * np.hypot(
            ph.LAB_SD_FAT_PCT, ph.SURFACE_TO_BULK_SD_FAT_PCT
        )


def test_deterministic_and_idempotent(tmp_path: Path, small: Path) -> None:
    again = synthesize(tmp_path / "again", SMALL, progress=False, workers=1)
    assert _digest(again) == _digest(small)  # byte-identical, whatever the threads
    other = synthesize(tmp_path / "other", SynthSpec(**{**SMALL.to_json(), "seed": 4}), progress=False)
    assert _digest(other) != _digest(small)
    before = {p: p.stat().st_mtime_ns for p in again.rglob("*")}
    assert synthesize(again, SMALL, progress=False) == again  # finished: returns at once
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*")} == before
    with pytest.raises(InputError, match="another spec"):
        synthesize(again, SynthSpec(**{**SMALL.to_json(), "seed": 9}), progress=False)


def test_interrupted_run_leaves_no_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = scanner._write_truth

    def failing(path: Path, scene: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(path, scene)

    monkeypatch.setattr(scanner, "_write_truth", failing)
    root = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        synthesize(root, SMALL, progress=False, workers=1)
    assert not root.exists()  # everything went to the temp folder
    monkeypatch.setattr(scanner, "_write_truth", real)
    synthesize(root, SMALL, progress=False)  # a rerun finishes and cleans up
    assert (root / "_SUCCESS.json").is_file()
    assert not (tmp_path / "data.synth-tmp").exists()


def test_existing_root_without_success_is_completed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "config.yaml").write_text("x: 1\n")
    synthesize(root, SMALL, progress=False)
    assert (root / "config.yaml").is_file() and (root / "_SUCCESS.json").is_file()


def test_nir_preset_and_overrides(tmp_path: Path) -> None:
    spec = SynthSpec(instrument="nir", n_samples=6, lines=20, samples=16, seed=2)
    assert spec.wavelengths().size == 224
    np.testing.assert_allclose(spec.wavelengths()[[0, -1]], [900, 1700])
    root = synthesize(tmp_path / "nir", spec, progress=False)
    rows = _refs(root)
    raw = root / rows[0]["scan_id"] / "capture" / f"{rows[0]['scan_id']}.raw"
    assert raw.stat().st_size == 20 * 16 * 224 * 2
    custom = SynthSpec(bands=50, wavelength_range=[950, 1650])  # a list, as from pydantic
    assert custom.wavelength_range == (950.0, 1650.0)
    np.testing.assert_allclose(custom.wavelengths()[[0, -1]], [950, 1650])
    assert SynthSpec().wavelengths().size == 300


def test_spec_from_config() -> None:
    assert SynthSpec.from_config(SynthConfig()) == SynthSpec()
    section = SynthConfig.model_validate(
        {
            "instrument": "nir",
            "n_samples": 7,
            "lines": 20,
            "samples": 18,
            "bands": 30,
            "wavelength_range": [950, 1650],  # a list, as YAML gives it
            "scans_per_sample": 2,
            "seed": 9,
        }
    )
    spec = SynthSpec.from_config(section)
    assert spec == SynthSpec(
        instrument="nir",
        n_samples=7,
        lines=20,
        samples=18,
        bands=30,
        wavelength_range=(950.0, 1650.0),
        scans_per_sample=2,
        seed=9,
    )
    # The synth stage's key hashes the section, _SUCCESS.json records the spec: they must agree.
    assert spec.to_json() == section.model_dump(mode="json")
    assert {f.name for f in fields(SynthSpec)} == set(SynthConfig.model_fields)


def test_bad_specs_name_the_field() -> None:
    with pytest.raises(ConfigError, match="wavelength_range"):
        SynthSpec(wavelength_range=(1000, 900))
    with pytest.raises(ConfigError, match="n_samples"):
        SynthSpec(n_samples=2)
    with pytest.raises(ConfigError, match="instrument"):
        SynthSpec(instrument="swir")  # type: ignore[arg-type]
