"""Benchmark: chemmap's U-Net against a plain reference U-Net (not run in CI).

Both networks have the same widths, depth and options (valid or same convolutions,
bilinear up-sampling + 1x1 convolution, no normalisation, the paper's set-up); the
reference is written below in the textbook way (interpolate, then the 1x1 convolution,
at full resolution). For each precision it times forward + backward of a mean-squared
loss and reports throughput in input pixels per second and peak memory, and the ratio
chemmap / reference measured in the same run.

- CPU: fp32, and bf16 under ``torch.autocast("cpu")``. Peak memory is the bytes of the
  tensors autograd saves for backward (the activation memory; weights excluded).
- CUDA (if available): fp32 with PyTorch's default TF32 setting for convolutions
  (``torch.backends.cudnn.allow_tf32``, printed), and bf16 autocast + channels_last.
  Peak memory is ``torch.cuda.max_memory_allocated`` during one step.

    .venv/bin/python bench/model.py            # CPU: about 30-60 s on 2 cores
    .venv/bin/python bench/model.py --tiny     # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chemmap.models.unet import UNet

# ----------------------------------------------------------------------------- reference


class RefDoubleConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, pad: bool) -> None:
        p = 1 if pad else 0
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=p), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=p), nn.ReLU(inplace=True),
        )  # fmt: skip


class RefUp(nn.Module):
    def __init__(self, c_in: int, c_out: int, pad: bool) -> None:
        super().__init__()
        self.pad = pad
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv1 = nn.Conv2d(c_in, c_out, 1)
        self.conv = RefDoubleConv(2 * c_out, c_out, pad)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(self.up(x)))  # (B, C_out, 2h, 2w)
        if self.pad:
            dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        else:
            top, left = (skip.shape[-2] - x.shape[-2]) // 2, (skip.shape[-1] - x.shape[-1]) // 2
            skip = skip[..., top : top + x.shape[-2], left : left + x.shape[-1]]
        return self.conv(torch.cat([skip, x], dim=1))


class ReferenceUNet(nn.Module):
    """The textbook U-Net: double conv, max pool, up-sample, crop/pad, concatenate."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, features: int, pad: bool) -> None:
        super().__init__()
        widths = [features * 2**i for i in range(depth)]
        self.pool = nn.MaxPool2d(2)
        pairs = zip([in_channels, *widths[:-1]], widths, strict=True)
        self.downs = nn.ModuleList(RefDoubleConv(c_in, c_out, pad) for c_in, c_out in pairs)
        self.ups = nn.ModuleList(RefUp(widths[i + 1], widths[i], pad) for i in reversed(range(depth - 1)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.downs):
            x = down(self.pool(x) if i else x)
            skips.append(x)
        x = skips.pop()
        for up in self.ups:
            x = up(skips.pop(), x)
        return self.head(x)


# ----------------------------------------------------------------------------- timing


def saved_bytes(step: Callable[[], None]) -> int:
    """Bytes of the tensors autograd saves during one step (activation memory on the CPU)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def make_step(model: nn.Module, x: torch.Tensor, precision: str) -> Callable[[], None]:
    """One training step's compute: forward, a mean-squared loss, backward."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
            loss = out.float().square().mean()
        loss.backward()

    return step


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    if device.type != "cuda":
        return saved_bytes(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def measure(models: dict[str, nn.Module], x: torch.Tensor, precision: str, iters: int, warmup: int) -> dict:
    """Best-of-``iters`` step time per model, the models interleaved (fair on shared cores)."""
    steps = {name: make_step(model, x, precision) for name, model in models.items()}
    for step in steps.values():
        for _ in range(warmup):
            step()
    peaks = {name: peak_bytes(step, x.device) for name, step in steps.items()}
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(iters):
        for name, step in steps.items():
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
    return {
        name: {"seconds": best[name], "pixels_per_s": pixels / best[name], "peak_mib": peaks[name] / 2**20}
        for name in steps
    }


def run(args: argparse.Namespace) -> list[dict]:
    devices = [] if args.cuda_only else ["cpu"]
    devices += ["cuda"] if torch.cuda.is_available() and not args.cpu_only else []
    rows = []
    for device in devices:
        for pad in args.pad:
            torch.manual_seed(0)
            ours = UNet(
                in_channels=args.channels, out_channels=1, depth=args.depth, features=args.features, pad=pad
            )
            ref = ReferenceUNet(args.channels, 1, args.depth, args.features, pad)
            size = ours.valid_size(args.size)
            for precision in ("fp32", "bf16"):
                channels_last = device == "cuda" and precision == "bf16"
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                x = torch.randn(args.batch, args.channels, size, size, device=device).to(memory_format=fmt)
                models = {"reference": ref, "chemmap": ours}
                models = {k: m.to(device=device, memory_format=fmt) for k, m in models.items()}
                result = measure(models, x, precision, args.iters, args.warmup)
                row = {
                    "device": device, "pad": pad, "precision": precision, "size": size,
                    "channels_last": channels_last,
                    **{f"{k}_{m}": v for k in result for m, v in result[k].items()},
                    "speedup": result["chemmap"]["pixels_per_s"] / result["reference"]["pixels_per_s"],
                    "memory_ratio": result["chemmap"]["peak_mib"] / result["reference"]["peak_mib"],
                }  # fmt: skip
                rows.append(row)
                print(
                    f"{device:4s} pad={pad!s:5s} {precision} {args.batch}x{args.channels}x{size}x{size}: "
                    f"reference {row['reference_pixels_per_s'] / 1e3:8.1f} kpx/s "
                    f"{row['reference_peak_mib']:7.0f} MiB | "
                    f"chemmap {row['chemmap_pixels_per_s'] / 1e3:8.1f} kpx/s "
                    f"{row['chemmap_peak_mib']:7.0f} MiB | "
                    f"speed x{row['speedup']:.2f}, memory x{row['memory_ratio']:.2f}",
                    flush=True,
                )
    return rows


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--tiny", action="store_true", help="a few-second smoke run")
    parser.add_argument("--size", type=int, default=316, help="input side (raised to an accepted size)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels", type=int, default=56, help="input bands (paper: 56 after front-end)")
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--pad", type=lambda s: s.lower() == "true", nargs="+", default=[False, True])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--cuda-only", action="store_true", help="skip the CPU rows (e.g. paper-size inputs)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if args.tiny:
        args.size, args.batch, args.channels, args.depth, args.features, args.iters = 44, 1, 8, 3, 4, 2
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} threads, "
        f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}, "
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} (fp32 convolutions on CUDA use TF32 if True)"
    )
    rows = run(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
