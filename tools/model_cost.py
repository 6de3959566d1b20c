"""Model size and bit operations of the diffusion network (paper Tables 1-2: "Size (MB)", "TBops").

    python tools/model_cost.py --config configs/cifar10.yml --bits 32/32 6/6 4/4

Size: every parameter at its storage precision (quantized layer weights at their weight bits, the
first/last layer at 8, biases and norm parameters at 32), in MB (10^6 bytes). Bit operations: each
multiply-accumulate of a conv/linear layer costs w_bits x a_bits, each of an attention matmul
a_bits x a_bits (the softmax operand at sm_abit); one network evaluation on one image, in 10^12.
Decoders and text encoders are not counted (SPEC §6). No weights are needed: shapes decide both.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from ddim import UNet, load_config  # noqa: E402
from quant.adapters import adapter_for  # noqa: E402
from tools.common import parse_bits  # noqa: E402


def count_macs(model: nn.Module, x: torch.Tensor, t: torch.Tensor, **cond) -> dict[str, tuple[str, int]]:
    """name -> (kind, MACs) for every conv (1d/2d), linear and attention matmul, from one forward
    model(x, t, **cond) (cond: e.g. context= of a cross-attention UNet; the meta device works)."""
    macs, hooks = {}, []
    matmuls = adapter_for(model).softmax_operands(model)

    def hook(name):
        def fn(mod, args, out):
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                k = mod.in_channels // mod.groups * math.prod(mod.kernel_size)
                macs[name] = ("layer", out.numel() * k)
            elif isinstance(mod, nn.Linear):
                macs[name] = ("layer", out.numel() * mod.in_features)
            else:                                           # bmm [N,a,b] @ [N,b,c]
                macs[name] = ("matmul", out.numel() * args[0].shape[-1])
        return fn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) or name in matmuls:
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(x, t, **cond)
    finally:
        for h in hooks:
            h.remove()
    return macs


def cost(model: nn.Module, macs: dict, w_bit: int, a_bit: int, sm_abit: int | None = None,
         edge_bit: int = 8) -> dict[str, float]:
    """{"size_mb", "tbops", "tbops_no_matmul"}: the last leaves out the attention matmuls, as the
    profiler behind the paper's numbers appears to (CIFAR-10 FP: 6.17 vs the paper's 6.2 TBops)."""
    fp = w_bit >= 32
    first, last = adapter_for(model).edge_layers(model)
    matmuls = adapter_for(model).softmax_operands(model)
    bits = 0
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        is_weight = name.endswith("weight") and layer in macs and macs[layer][0] == "layer"
        bits += p.numel() * (32 if fp or not is_weight else (edge_bit if layer in (first, last) else w_bit))
    bops = {"layer": 0, "matmul": 0}
    for name, (kind, n) in macs.items():
        if fp:
            bops[kind] += n * 32 * 32
        elif kind == "layer":
            bops[kind] += n * (edge_bit * edge_bit if name in (first, last) else w_bit * a_bit)
        else:
            softmax = matmuls.get(name) is not None
            bops[kind] += n * a_bit * ((sm_abit or a_bit) if softmax else a_bit)
    return {"size_mb": bits / 8 / 1e6, "tbops": (bops["layer"] + bops["matmul"]) / 1e12,
            "tbops_no_matmul": bops["layer"] / 1e12}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cifar10.yml")
    p.add_argument("--bits", nargs="+", default=["32/32", "8/8", "6/6", "4/4"], help="W/A pairs")
    p.add_argument("--sm_abit", type=int, default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    model = UNet(cfg.model).eval()
    x = torch.zeros(1, cfg.channels, cfg.image_size, cfg.image_size)
    macs = count_macs(model, x, torch.zeros(1, dtype=torch.long))
    print(f"{cfg.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{sum(n for _, n in macs.values()) / 1e9:.3f} GMACs per image per step")
    for pair in args.bits:
        w, a = parse_bits(pair)
        c = cost(model, macs, w, a, args.sm_abit)
        print(f"W{w}A{a}: size {c['size_mb']:.1f} MB, {c['tbops']:.4f} TBops "
              f"({c['tbops_no_matmul']:.4f} without attention matmuls)")


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
