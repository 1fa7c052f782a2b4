"""Physical constants of the synthetic pushbroom scanner, each with its source.

The scanner models diffuse reflectance of meat as Beer-Lambert absorption along an
effective optical path, with multiplicative and additive scatter on top:

    R(λ) = m · (λ / λ0)^(-b) · exp(-L · Σ_k c_k ε_k(λ)) + a

where ``c_k`` is the mass fraction (0-1) of constituent k in a pixel, ``ε_k`` its
effective absorption spectrum (natural-log absorbance per unit fraction and unit
relative path), ``L`` the relative path length, ``m``, ``b`` and ``a`` the scatter
terms. The ``ε_k`` are sums of Gaussian bands at the centres tabulated by Beć & Huck
(Molecules 2020, Table 1) and, in the visible, at the myoglobin bands reviewed by Mancini &
Hunt (Meat Sci. 2005, 71, 100). Band *strengths* follow the overtone ladder (a first
overtone is roughly 10x a second, a second roughly 10x a third: Workman & Weyer,
*Practical Guide to Interpretive Near-Infrared Spectroscopy*, 2007), scaled by us so that
lean and fat pork show band depths of the order seen in published meat reflectance spectra
(e.g. Barbin et al. 2013, below); they are effective values, not molar absorptivities.

Version 2 (issue 14) takes out the shortcuts of version 1, physics first:

- camera noise (shot, read, dark; EMVA 1288, release 4.0, 2021) at real line-scan cameras'
  signal-to-noise ratios, per instrument (``PEAK_SNR``), instead of one effective noise level
  calibrated to a figure;
- per-pixel physical variation of the spectrum, correlated across bands and independent
  between pixels (a line-scan camera's point spread is about a pixel): shading by the tilt of
  the cut surface, multiplicative and additive scatter, optical path length, wet-surface
  specular reflection;
- tissue compositions that vary between bellies and within one (adipose lipid content, lean
  intramuscular fat);
- bright tissue that is not fat: rind (skin) at one side of the slab and connective-tissue
  membranes in the lean;
- lab values of the whole ground sample: the scanned surfaces' mean plus a per-sample
  surface-to-bulk difference, plus the lab method's error;
- fat's 930 nm band on the overtone ladder.

Where a constant could not be read off a source it is marked *assumed*, with the reasoning.
None was set to reach a realism figure: ``chemmap.synth.realism`` measures the figures and
the README reports them, misses included.
"""

from __future__ import annotations

import numpy as np

# --- Wavelength presets --------------------------------------------------------------------------
# VNIR: 300 bands over ~400-1000 nm, the camera of Engstrøm et al. 2025 (whose recipe drops the
# first 176 bands, those below ~750 nm, and bins pairs).
VNIR_RANGE_NM = (400.0, 1000.0)
VNIR_BANDS = 300
# NIR: 224 bands over 900-1700 nm, like a Specim FX17 (Specim FX17 datasheet).
NIR_RANGE_NM = (900.0, 1700.0)
NIR_BANDS = 224

# --- Composition of pork tissue (% by mass) ------------------------------------------------------
# Lean pork muscle: ~75 % water, ~21-22 % protein, 1-3 % intramuscular fat, ~1 % ash
# (USDA FoodData Central, pork loin, separable lean only, raw; Lawrie's Meat Science, 8th ed.
# 2017). Porcine back/belly adipose tissue: 80-90 % lipid, 7-15 % water,
# 2-4 % protein (Wood et al., Meat Sci. 2008, 78, 343).
# Both vary between bellies (animal, genotype, feeding) and within a belly (muscle to muscle,
# inner to outer fat layer): a belly-level draw plus a smooth within-belly field.
# Lipid in porcine adipose tissue rises with the animal's fatness, ~65-90 % (Wood et al. 2008).
ADIPOSE_FAT_PCT = 80.0  # mean over bellies
ADIPOSE_FAT_BELLY_SD = 4.0
ADIPOSE_FAT_WITHIN_SD = 3.0
ADIPOSE_FAT_RANGE_PCT = (62.0, 92.0)
# Intramuscular fat of pork muscles: ~1-6 % (Lawrie's Meat Science; belly muscles at the upper end
# of loin values). Log-normal between bellies; within a belly, an absolute smooth variation.
LEAN_FAT_PCT = 3.0  # median over bellies
LEAN_FAT_BELLY_LOG_SD = 0.35
LEAN_FAT_WITHIN_SD = 0.8
LEAN_FAT_RANGE_PCT = (0.8, 8.0)
# Collagen-rich tissue that is bright but not fat. *Assumed* compositions, of the order that food
# composition tables give for pork rind (skin) and for connective tissue: mostly water and protein
# (collagen), a little fat.
RIND_FAT_PCT, RIND_WATER_PCT = 10.0, 58.0  # protein: the rest less ash
MEMBRANE_FAT_PCT, MEMBRANE_WATER_PCT = 4.0, 64.0
ASH_PCT = 1.0  # minerals, constant
# Water share of the fat-free, ash-free mass (water / (water + protein)); lean ~75/(75+21.5).
WATER_SHARE_OF_LEAN = 0.777
WATER_SHARE_SD = 0.008  # between animals (order of the ranges in Lawrie's Meat Science)
# Sample-level fat of pork bellies: ~10-60 % (the range of belly chemistry in Engstrøm et al. 2025).
SAMPLE_FAT_RANGE_PCT = (10.0, 60.0)

# Lab error of the reference fat method: ~0.5-1 % fat (DESIGN.md; the repeatability order of
# Soxhlet extraction, AOAC 991.36). Protein (Kjeldahl, AOAC 981.10) and water (oven drying,
# AOAC 950.46) repeat to a few tenths of a percent.
LAB_SD_FAT_PCT = 0.75
# The lab grinds the whole sample; the camera sees its surfaces. *Assumed*: the bulk differs from
# the scanned surfaces' mean by a per-sample amount of the order of the difference between a
# belly's two faces (~3 % fat, the scans_per_sample spread below), taken as 2 % fat SD. Water and
# protein make up the difference in their own proportion.
SURFACE_TO_BULK_SD_FAT_PCT = 2.0
LAB_SD_PROTEIN_PCT = 0.3
LAB_SD_WATER_PCT = 0.4

# --- Absorption bands: (centre nm, FWHM nm, peak ε) per constituent -------------------------------
# Centres: Beć & Huck 2020, Table 1. ε is natural-log absorbance at relative path 1 for a pure
# constituent (fraction 1). Overtone ladder: 1st overtone ~1, combination ~0.3-0.5, 2nd overtone
# ~0.1, 3rd overtone ~0.01-0.02 (Workman & Weyer 2012).
FAT_BANDS: tuple[tuple[float, float, float], ...] = (
    # C-H 3rd overtone (CH2): on the ladder, ~0.1 of the 2nd overtone at 1210 nm (Workman & Weyer).
    # Version 1 had 0.20 here, 10-20x the ladder.
    (930.0, 40.0, 0.03),
    (1040.0, 40.0, 0.012),  # C-H combination (2nd overtone + deformation)
    (1210.0, 50.0, 0.30),  # C-H 2nd overtone (CH2)
    (1395.0, 50.0, 0.40),  # C-H combination (2ν + δ)
    (1420.0, 40.0, 0.20),
    (1725.0, 45.0, 1.10),  # C-H 1st overtone (CH2 asymmetric)
    (1765.0, 40.0, 0.80),  # C-H 1st overtone (CH2 symmetric)
    (460.0, 60.0, 0.25),  # carotenoids: pork fat is white to slightly yellow (Wood et al. 2008)
)
WATER_BANDS: tuple[tuple[float, float, float], ...] = (
    (745.0, 40.0, 0.020),  # O-H 3rd overtone (740-760 nm)
    (840.0, 50.0, 0.010),  # O-H combination
    (970.0, 60.0, 0.25),  # O-H 2nd overtone
    (1195.0, 70.0, 0.40),  # O-H combination (2ν + δ), 1190-1200 nm
    (1450.0, 110.0, 1.60),  # O-H 1st overtone
)
PROTEIN_BANDS: tuple[tuple[float, float, float], ...] = (
    (1020.0, 60.0, 0.10),  # N-H 2nd overtone
    (1180.0, 50.0, 0.06),  # C-H 2nd overtone of protein
    (1505.0, 70.0, 0.55),  # N-H 1st overtone (1500-1510 nm)
    (1690.0, 50.0, 0.35),  # C-H 1st overtone of protein
)
# Myoglobin (oxy- and deoxymyoglobin) in lean: Soret band and Q bands (Mancini & Hunt 2005).
# Expressed per unit *lean* fraction (myoglobin is ~0.2 % of lean; its ε is ~1000x protein's).
MYOGLOBIN_BANDS: tuple[tuple[float, float, float], ...] = (
    (425.0, 45.0, 2.2),  # Soret band
    (542.0, 25.0, 0.9),  # oxymyoglobin α/β
    (558.0, 30.0, 0.5),  # deoxymyoglobin
    (582.0, 20.0, 1.0),  # oxymyoglobin
    (630.0, 40.0, 0.10),  # metmyoglobin
)
MYOGLOBIN_SD = 0.20  # relative between-sample variation of meat colour (Mancini & Hunt 2005)

# Band-position shifts, between samples. Unsaturated fat moves C-H bands by a few nm
# (Beć & Huck 2020, discussion of =C-H near 1160/1210 nm); water bands move ~0.5 nm/°C and meat
# is scanned at 2-10 °C on lines (water's temperature shift: Segtnan et al., Anal. Chem. 2001, 73, 3153).
FAT_SHIFT_SD_NM = 0.5
WATER_SHIFT_SD_NM = 0.5

# --- Scatter and path length (Geladi, MacDougall & Martens, Appl. Spectrosc. 1985, 39, 491) -----
# Geladi et al. found fat in meat adds both multiplicative and additive scatter.
# Multiplicative term m: lean ~0.55, adipose ~0.85 (white fat scatters strongly).
SCATTER_M_LEAN = 0.58
SCATTER_M_FAT = 0.88
# Lean lightness varies between pigs (pale to dark pork): CIE L* of pork loins has an SD of
# ~3 units around 50 (e.g. Huff-Lonergan et al., J. Anim. Sci. 2002, 80, 617), and
# Y ∝ ((L* + 16) / 116)^3 gives dY/Y = 3 dL* / (L* + 16) ≈ 0.14 relative. Within a belly,
# muscles differ in colour too (red vs white fibres): *assumed* 5 % relative, smooth in space.
LEAN_LIGHTNESS_BELLY_SD = 0.14
LEAN_LIGHTNESS_WITHIN_SD = 0.05
# Collagen (skin, fascia) is white: dense collagen fibres scatter at least as strongly as fat
# (reduced scattering of dermis vs subcutaneous fat: Jacques, Phys. Med. Biol. 2013, 58, R37).
SCATTER_M_RIND = 0.85
SCATTER_M_MEMBRANE = 0.82
SCATTER_M_SAMPLE_SD = 0.04  # relative, between samples (surface moisture, bloom)
SCATTER_M_PIXEL_SD = 0.03  # relative, pixel to pixel (surface micro-texture), white in space
SCATTER_M_SMOOTH_SD = 0.05  # relative, smooth in space (surface height / orientation)
# Additive offset a (reflectance units): fat adds more (Geladi 1985).
SCATTER_A_LEAN = 0.01
SCATTER_A_FAT = 0.04
SCATTER_A_SAMPLE_SD = 0.010
SCATTER_A_PIXEL_SD = 0.004
SCATTER_A_COLLAGEN = 0.03
# Wavelength slope b of the scatter (Mie/Rayleigh-like λ^-b; tissue b ~0.5-1.5, Jacques,
# Phys. Med. Biol. 2013, 58, R37); per sample and per pixel.
SCATTER_B_MEAN = 0.6
SCATTER_B_SAMPLE_SD = 0.08
SCATTER_B_PIXEL_SD = 0.05
SCATTER_REF_NM = 800.0  # λ0
# Relative path length L (penetration varies with tissue and thickness): per sample and per pixel.
PATH_SAMPLE_SD = 0.04
# Per pixel: muscle scatters anisotropically along its fibres, so the diffuse path changes with the
# local fibre direction (Ranasinghesagara & Yao, Opt. Express 2007, 15, 3998: diffuse reflectance
# of muscle differs by tens of % along and across the fibres). *Assumed* 10 % SD.
PATH_PIXEL_SD = 0.10
PATH_SMOOTH_SD = 0.05
PATH_EDGE_LOSS = 0.35  # thinner slab at the edge: path shrinks by up to this share

# --- Surface geometry: shading and specular reflection, per pixel ---------------------------------
# Line lights shine at ~45 deg onto the belt (typical line-scan lighting). A facet tilted by δ
# from the belt's plane receives cos(45° ± δ)/cos(45°) ≈ 1 ∓ δ of the light: diffuse reflectance
# is scaled by it in every band alike. *Assumed*: a cut, wet meat surface is rough at the
# millimetre scale, facet tilts ~8 deg SD (0.14 rad) at the pixel scale, independent between
# pixels (the roughness is finer than a pixel's footprint).
LIGHT_INCIDENCE_RAD = 0.785
TILT_SD_RAD = 0.14
# Wet surfaces reflect specularly: Fresnel reflectance of water (n = 1.33) at normal incidence is
# 2 %, spectrally flat. A pixel sees the share of its micro-facets that face the camera's
# half-angle: *assumed* exponential over pixels with mean 0.3 of the Fresnel value (most pixels a
# little, a few much; the saturating highlights are GLARE below).
FRESNEL_WATER = 0.02
SPECULAR_MEAN_SHARE = 0.3

# --- Scene ---------------------------------------------------------------------------------------
# Conveyor belts on hyperspectral lines are dark (black PU/PVC, a few % reflectance), so a threshold
# at ~0.15 reflectance separates meat from belt (chemmap.preprocess.mask).
BELT_REFLECTANCE = 0.045
BELT_REFLECTANCE_SD = 0.004  # pixel-to-pixel texture
SAMPLE_AREA_RANGE = (0.40, 0.65)  # share of the image covered by the sample
# Trimmed pork bellies are ~25-30 cm across (the short side); the scene scales with the image, so
# the pixel pitch is the belly's size over its size in pixels (chemmap.synth.realism reports it).
BELLY_WIDTH_MM = 270.0
# Rind: the skin at one long side of the belly, seen from above where the slab's edge rolls
# (*assumed* 8-25 mm wide); membranes: fascia between muscles, ~0.5-1.5 mm thick sheets seen
# edge-on as lines in the lean (*assumed*), spaced like the belly's muscles.
RIND_WIDTH_MM = (8.0, 25.0)
MEMBRANE_WIDTH_MM = (0.5, 1.5)
GLARE_PIXEL_SHARE = 0.003  # specular highlights on wet fat, share of fat pixels (saturating)
GLARE_STRENGTH = (1.0, 3.0)  # additive reflectance of a highlight (specular, spectrally flat)

# --- Illumination and detector -------------------------------------------------------------------
# Halogen line lights, colour temperature ~3000 K (halogen lamp datasheets). Spectral responsivity:
# silicon CMOS for VNIR (falls toward 400 and 1000 nm), InGaAs for NIR (flat 950-1650 nm).
LAMP_TEMPERATURE_K = 3000.0
# Illumination across the line falls to this share at the ends (cos^4-like lens + line-light
# fall-off; of the order seen across push-broom lines' white references).
ILLUMINATION_EDGE = 0.65
DETECTOR_BITS = 12
CEILING = 2**DETECTOR_BITS - 1  # 4095: the header's 'ceiling'
# Exposure: on a belt moving at line speed the exposure is short; the white tile peaks at ~30 % of
# the range, leaving headroom for glare on wet fat.
WHITE_LEVEL_COUNTS = 1200.0
DARK_LEVEL_COUNTS = 110.0  # dark offset + dark current at line-scan exposure (EMVA 1288 datasheets)
DARK_FPN_SD = 6.0  # dark-signal non-uniformity, counts (fixed pattern per detector element)
PRNU_SD = 0.015  # photo-response non-uniformity, relative (EMVA 1288)
READ_NOISE_COUNTS = 2.5  # counts rms
# Photo-electrons per count from the cameras' peak SNR: a shot-noise-limited pixel at full scale
# has SNR = sqrt(electrons), so electrons per count = SNR^2 / CEILING. Specim FX10 (VNIR,
# 400-1000 nm): peak SNR 420:1; Specim FX17 (NIR, 900-1700 nm): peak SNR 1000:1 (Specim
# datasheets). At the white tile's level (WHITE_LEVEL_COUNTS) the SNR is then ~230 (VNIR) and
# ~540 (NIR) at the brightest band, and falls where the lamp and the sensor are weak.
# Version 1 used 0.005 e-/count (an effective level calibrated to a figure, SNR ~2.5).
PEAK_SNR = {"vnir": 420.0, "nir": 1000.0}


def electrons_per_count(instrument: str) -> float:
    """Photo-electrons behind one count of ``instrument``'s camera (from its peak SNR)."""
    return PEAK_SNR[instrument] ** 2 / CEILING


REF_LINES = 20  # lines recorded for WHITEREF/DARKREF
# Detector defects (per camera, so the same in every scan of one dataset): a dead spatial column
# (all bands) and a few dead elements; hot pixels per scan (EMVA 1288 "defect pixels").
DEAD_COLUMNS = 1
DEAD_ELEMENTS = 3
HOT_PIXELS_PER_MPX = 60.0


def wavelengths_for(instrument: str, bands: int | None, wavelength_range: tuple[float, float] | None):
    """Band centres (nm, float64 ``(bands,)``) of an instrument preset, optionally overridden."""
    if instrument == "vnir":
        lo, hi = VNIR_RANGE_NM
        n = VNIR_BANDS
    elif instrument == "nir":
        lo, hi = NIR_RANGE_NM
        n = NIR_BANDS
    else:
        raise ValueError(f"instrument must be 'vnir' or 'nir', got {instrument!r}.")
    if wavelength_range is not None:
        lo, hi = (float(v) for v in wavelength_range)
    if bands is not None:
        n = int(bands)
    return np.linspace(lo, hi, n)


def band_spectrum(wl: np.ndarray, bands_table: tuple[tuple[float, float, float], ...]) -> np.ndarray:
    """Sum of Gaussian bands ``(centre nm, FWHM nm, peak)`` at wavelengths ``wl`` (nm)."""
    wl = np.asarray(wl, dtype=np.float64)
    out = np.zeros_like(wl)
    for centre, fwhm, peak in bands_table:
        sigma = fwhm / 2.3548
        out += peak * np.exp(-0.5 * ((wl - centre) / sigma) ** 2)
    return out


def band_derivative(wl: np.ndarray, bands_table: tuple[tuple[float, float, float], ...]) -> np.ndarray:
    """d/dλ of :func:`band_spectrum` (per nm): a shift δ of every band adds ``-δ · derivative``."""
    wl = np.asarray(wl, dtype=np.float64)
    out = np.zeros_like(wl)
    for centre, fwhm, peak in bands_table:
        sigma = fwhm / 2.3548
        g = peak * np.exp(-0.5 * ((wl - centre) / sigma) ** 2)
        out += -g * (wl - centre) / sigma**2
    return out


def illumination_spectrum(wl: np.ndarray, instrument: str) -> np.ndarray:
    """Relative signal of the white tile per band, peak 1: halogen lamp × detector responsivity."""
    wl = np.asarray(wl, dtype=np.float64)
    h, c, k = 6.626e-34, 2.998e8, 1.381e-23
    lam = wl * 1e-9
    planck = 1.0 / (lam**5 * (np.exp(h * c / (lam * k * LAMP_TEMPERATURE_K)) - 1.0))
    if instrument == "vnir":
        # Silicon CMOS quantum efficiency: rises from ~25 % at 400 nm to ~60 % at 600 nm, falls to ~10 %
        # at 1000 nm (Sony IMX-class sensors' QE curves).
        qe = np.interp(
            wl,
            [380, 400, 500, 600, 700, 800, 900, 1000, 1020],
            [0.2, 0.25, 0.5, 0.6, 0.55, 0.4, 0.22, 0.08, 0.06],
        )
    else:
        # InGaAs: ~70-80 % from 950 to 1600 nm, cut-off near 1700 nm (Hamamatsu G11097 datasheet).
        qe = np.interp(
            wl,
            [880, 900, 950, 1100, 1500, 1600, 1650, 1700, 1720],
            [0.3, 0.45, 0.7, 0.8, 0.8, 0.75, 0.6, 0.35, 0.25],
        )
    s = planck * qe
    return s / s.max()
