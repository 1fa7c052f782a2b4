"""The built-in synthetic pushbroom scanner: pork-belly scans, lab values and true maps."""

from __future__ import annotations

from chemmap.synth.scanner import SynthSpec, synthesize

__all__ = ["SynthSpec", "synthesize"]
