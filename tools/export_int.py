"""Export a calibrated model as a packed integer file: weights as int8, or int4 two per byte, with per-out-channel
Δ_w and zero points; per-slot Δ_x, z_x (TPQ) and split channels; dilation scales folded in; FP32 only for what stays
FP (norms, embeddings, biases). The first stage and the text encoder of an LDM are not part of the file.

    python tools/export_int.py --cali_ckpt runs/x/quantized.pt --out runs/x/unet_w4a4.int

Sample with it: the sampling scripts' --backend int --cali_ckpt runs/x/unet_w4a4.int (same flags as the run that
calibrated it). Prints the sizes on disk: the FP32 network, quantized.pt and the packed file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.errors import UsageError  # noqa: E402
from common.files import file_digest  # noqa: E402
from experiments.networks import build_network, network_of_config  # noqa: E402
from experiments.runtime import code_version  # noqa: E402
from quant.checkpoint import load_quantized, read_quantized  # noqa: E402
from quant.deploy import convert, save_int  # noqa: E402


def export(cali_ckpt: Path, out: Path, config: str | None = None) -> dict:
    """Write the packed file of `cali_ckpt`; -> sizes in bytes and what stays simulated."""
    payload = read_quantized(cali_ckpt)
    network = payload.get("meta", {}).get("network") or (network_of_config(config) if config else None)
    if network is None:
        raise UsageError(f"--cali_ckpt {cali_ckpt} does not say which network it quantizes (made before this was "
                         f"recorded)", "pass --config, the model config it was calibrated with")
    fp = build_network(network)
    qmodel, payload = load_quantized(cali_ckpt, fp, payload)
    header = {"method": payload["method"], "network": network, "sampler": payload.get("meta", {}).get("sampler"),
              "source": {"path": str(cali_ckpt), "sha256": file_digest(cali_ckpt)},
              "provenance": code_version() | {"torch": torch.__version__}}
    ints = convert(qmodel, compiled=False)
    save_int(out, ints, header)
    fp_bytes = sum(p.numel() * 4 for p in fp.parameters())
    return {"fp32_network_bytes": fp_bytes, "quantized_pt_bytes": cali_ckpt.stat().st_size,
            "packed_bytes": out.stat().st_size, "simulated": ints.simulated}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cali_ckpt", required=True, help="a calibrated quantized.pt")
    p.add_argument("--out", required=True, help="the packed file to write (e.g. runs/x/unet_w4a4.int)")
    p.add_argument("--config", default=None, help="the model config, for a quantized.pt that does not name its network")
    args = p.parse_args(argv)
    sizes = export(Path(args.cali_ckpt), Path(args.out), args.config)
    fp = sizes["fp32_network_bytes"]
    print(f"FP32 network {fp:,} B; quantized.pt {sizes['quantized_pt_bytes']:,} B "
          f"({sizes['quantized_pt_bytes'] / fp:.3f}x); packed {args.out} {sizes['packed_bytes']:,} B "
          f"({sizes['packed_bytes'] / fp:.3f}x FP32)")
    for entry in sizes["simulated"]:
        print(f"  stays {entry['kind']}: {entry['name']} ({entry['reason']})")
    return sizes


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
