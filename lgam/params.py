"""``lgam params``: parameter counts and GMACs next to the paper's Tables 1, 3 and 4.

MACs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` (``MACs = FLOPs / 2``);
it counts convolutions, matrix multiplies and the like, **not** elementwise ops (activations,
sigmoid gates, the attention modules' multiplies and adds, pooling), so attention modules whose
cost is mostly elementwise (SGE, LGAM's ladder) look cheaper than they are.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._format import format_or_dash
from .models import create_model

__all__ = ["count_params", "count_macs", "cost_metrics", "PAPER_PARAMS_M", "param_table", "configure_parser", "main"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics are buffers and are not counted)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int = 224, channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass on a ``(1, channels, S, S)`` input, in eval mode.

    Counted by ``FlopCounterMode`` (matmul/conv-like ops only; elementwise ops are not counted;
    LGAM's op counts its group MLPs through the formula registered in its ``ops`` module).
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        x = torch.zeros(1, channels, image_size, image_size, device=device, dtype=dtype)
        with FlopCounterMode(display=False) as counter:
            model(x)
        return counter.get_total_flops() // 2
    finally:
        model.train(was_training)


def cost_metrics(model: nn.Module) -> dict[str, float]:
    """A checkpoint's cost entries in its manifest metrics: ``params`` and ``gmacs_224`` (GMACs of
    one 224 px image, 4 decimals)."""
    return {"params": count_params(model), "gmacs_224": round(count_macs(model, 224) / 1e9, 4)}


#: The paper's parameter counts in millions: (CIFAR-10, CIFAR-100, ImageNet-20); ``None`` where the
#: paper gives none. Table 3 (CIFAR) and Table 4 (ImageNet-20) for ResNet18; Table 1 (CIFAR-100)
#: for the other backbones.
PAPER_PARAMS_M: dict[str, tuple[float | None, float | None, float | None]] = {
    "resnet18": (11.17, 11.22, 11.19),
    "resnet18_se": (11.26, 11.31, 11.27),
    "resnet18_sge": (11.17, 11.22, 11.19),
    "resnet18_cbam": (11.26, 11.31, 11.27),
    "resnet18_bam": (11.24, 11.29, 11.25),
    "resnet18_lgam": (11.20, 11.25, 11.22),
    "resnet34": (None, 21.33, None),
    "resnet34_lgam": (None, 21.39, None),
    "wrn16_10": (None, 17.43, None),
    "wrn16_10_lgam": (None, 17.48, None),
    "resnext29_32x4d": (None, 24.26, None),
    "resnext29_32x4d_lgam": (None, 24.34, None),
}
#: the paper's LGAM rows, also compared with our G=32, r=2 variant
PAPER_PARAMS_M.update({k.replace("_lgam", "_lgam_g32"): v for k, v in list(PAPER_PARAMS_M.items()) if k.endswith("_lgam")})

#: (column name, num_classes, stem)
HEADS = (("cifar10", 10, "cifar"), ("cifar100", 100, "cifar"), ("imagenet20", 20, "imagenet"))


@dataclass
class ParamRow:
    model: str
    params: dict[str, int]
    paper_m: dict[str, float | None]
    gmacs_224: float | None
    gmacs_32: float | None

    def diff_m(self, head: str) -> float | None:
        paper = self.paper_m[head]
        return None if paper is None else round(self.params[head] / 1e6 - paper, 4)


def param_table(models: list[str] | None = None, macs: bool = True) -> list[ParamRow]:
    """Rows for ``models`` (default: every model the paper reports). GMACs: ImageNet stem with the
    ImageNet-20 head at 224 px, CIFAR stem with the CIFAR-10 head at 32 px."""
    rows = []
    for name in models or list(PAPER_PARAMS_M):
        params, paper = {}, {}
        ref = PAPER_PARAMS_M.get(name, (None, None, None))
        for (head, nc, stem), p in zip(HEADS, ref):
            params[head] = count_params(create_model(name, num_classes=nc, stem=stem))
            paper[head] = p
        g224 = g32 = None
        if macs:
            g224 = count_macs(create_model(name, num_classes=20, stem="imagenet"), 224) / 1e9
            g32 = count_macs(create_model(name, num_classes=10, stem="cifar"), 32) / 1e9
        rows.append(ParamRow(name, params, paper, g224, g32))
    return rows


def format_markdown(rows: list[ParamRow]) -> str:
    head = (
        "| model | CIFAR-10 | paper | Δ (M) | CIFAR-100 | paper | Δ (M) | ImageNet-20 | paper | Δ (M) "
        "| GMACs 224 px | GMACs 32 px |\n|---|" + "---:|" * 11
    )
    lines = [head]
    for r in rows:
        cells = [r.model]
        for h, _, _ in HEADS:
            p = r.paper_m[h]
            cells += [f"{r.params[h]:,}", format_or_dash(p, ".2f", "M"),
                      format_or_dash(r.diff_m(h), "+.3f")]
        cells += [format_or_dash(r.gmacs_224, ".3f"), format_or_dash(r.gmacs_32, ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="models to count (default: every model in the paper's tables, plus lgam_g32)")
    p.add_argument("--no-macs", action="store_true", help="skip the GMAC counts (faster)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")


def main(args: argparse.Namespace) -> int:
    rows = param_table(args.models, macs=not args.no_macs)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_markdown(rows))
        print("\nΔ = ours − paper, in millions. GMACs from torch.utils.flop_counter: "
              "convolutions and matmuls only, elementwise ops not counted.")
    return 0


if __name__ == "__main__":
    from .cli import run_module

    sys.exit(run_module("lgam.params"))
