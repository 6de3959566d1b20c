"""Where a quantized LDM UNet's eps error comes from, and what guidance does with it.

    python studies/ldm_error_anatomy.py runs/mnist_ldm/{baseline_w4a4,qdiff_w4a4,dilatequant_w4a4}/quantized.pt \\
        --config configs/latent-diffusion/mnist-ldm-kl-4.yaml --calib runs/mnist_ldm/baseline_w8a8/calib.pt \\
        --out results/mnist_ldm_error_anatomy.json

Corrections (--eps_rescale) included. All on calibration inputs (FP guided trajectories; `--n` of them, a seeded subset), per checkpoint:
- `mse`: eps MSE to the FP UNet, everything quantized; then with only weights and only activations quantized.
- `groups`: the same MSE with one group of quantizers changed, for each group of layers (attention
  matmuls, time embedding, attention/feed-forward linears, ResBlock convs, the 1x1 skip projections of
  the residual stream, up/down-sampling): its activations kept FP (`acts_fp`), or its activations the only
  ones quantized (`only_acts`; weights FP everywhere).
- `per_timestep`: for each timestep, the least-squares slope of eps_q on eps_fp (1 = no shrinkage; below 1,
  the quantized eps is too small) and the MSE.
- `guided`: the guided eps (scale `--scale`, the sample's class against the null class) and its MSE, the
  conditional and unconditional MSE, and the cosine similarity of their errors.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.files import write_json  # noqa: E402
from experiments.ldm_task import load_model  # noqa: E402
from quant.calib_data import CalibSet  # noqa: E402
from quant.checkpoint import load_quantized  # noqa: E402
from quant.layers import QuantLayer, QuantMatMul  # noqa: E402

GROUPS = {
    "attention matmuls": lambda n, m: isinstance(m, QuantMatMul),
    "time embedding": lambda n, m: n.startswith("time_embed") or "emb_layers" in n,
    "attention and feed-forward linears": lambda n, m: isinstance(m, QuantLayer) and re.search(
        r"attn|\.ff\.|proj_in|proj_out", n) is not None,
    "ResBlock convs": lambda n, m: "in_layers" in n or "out_layers" in n,
    "skip projections": lambda n, m: "skip_connection" in n,
    "up/down-sampling": lambda n, m: n.endswith((".op", ".conv")),
}


def _set(modules, weight, act) -> None:
    for n, m in modules:
        if isinstance(m, QuantLayer):
            m.quant_weight = weight(n, m)
        m.quant_act = act(n, m) and len(m.a_quant) > 0


@torch.no_grad()
def anatomy(qmodel, fp, data: CalibSet, null_context, class_context, scale: float) -> dict:
    x, t, cond = data.x, data.t, data.cond
    ref = fp(x, t, **cond)
    mods = [(n, m) for n, m in qmodel.model.named_modules() if isinstance(m, (QuantLayer, QuantMatMul))]

    def mse() -> float:
        return float((qmodel(x, t, **cond) - ref).pow(2).mean())

    yes, no = (lambda n, m: True), (lambda n, m: False)
    out = {"mse": {}, "groups": {}}
    out["mse"]["all quantized"] = mse()
    _set(mods, yes, no)
    out["mse"]["weights only"] = mse()
    _set(mods, no, yes)
    out["mse"]["activations only"] = mse()
    for name, member in GROUPS.items():
        _set(mods, yes, lambda n, m, f=member: not f(n, m))
        acts_fp = mse()
        _set(mods, no, member)
        out["groups"][name] = {"layers": sum(member(n, m) for n, m in mods), "acts_fp": acts_fp,
                               "only_acts": mse()}
    _set(mods, yes, yes)

    eps = qmodel(x, t, **cond)
    out["per_timestep"] = {}
    for step in sorted(set(t.tolist())):
        sel = t == step
        q, f = eps[sel].double(), ref[sel].double()
        out["per_timestep"][int(step)] = {"samples": int(sel.sum()), "slope": float((q * f).sum() / (f * f).sum()),
                                          "mse": float((q - f).pow(2).mean())}

    fu, fc = fp(x, t, context=null_context), fp(x, t, context=class_context)
    qu, qc = qmodel(x, t, context=null_context), qmodel(x, t, context=class_context)
    eu, ec = (qu - fu).flatten(1), (qc - fc).flatten(1)
    guided_err = (qu + scale * (qc - qu)) - (fu + scale * (fc - fu))
    out["guided"] = {"scale": scale, "mse_uncond": float(eu.pow(2).mean()), "mse_cond": float(ec.pow(2).mean()),
                     "error_cosine": float(torch.nn.functional.cosine_similarity(eu, ec, dim=1).mean()),
                     "mse_guided": float(guided_err.pow(2).mean())}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="quantized.pt of LDM runs")
    p.add_argument("--config", required=True)
    p.add_argument("--calib", required=True, help="a calib.pt of the same model (FP guided trajectories)")
    p.add_argument("--n", type=int, default=512, help="calibration samples used (seeded subset)")
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    ldm, _ = load_model(argparse.Namespace(config=args.config, resume=None, ckpt=None), torch.device("cpu"))
    fp = ldm.model.diffusion_model.eval()
    data = CalibSet.load(Path(args.calib))
    data = data.subset(torch.randperm(len(data.t), generator=torch.Generator().manual_seed(args.seed))[:args.n])
    key, n = ldm.cond_stage_key, len(data.t)
    null_class = ldm.cond_stage_model.embedding.num_embeddings - 1
    labels = torch.randint(0, null_class, (n,), generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        null_context = ldm.get_learned_conditioning({key: torch.full((n,), null_class)})
        class_context = ldm.get_learned_conditioning({key: labels})
    result = {"config": args.config, "calib": args.calib, "n": n, "runs": {}}
    for path in args.checkpoints:
        qmodel, _ = load_quantized(path, copy.deepcopy(fp))
        result["runs"][path] = anatomy(qmodel.eval(), fp, data, null_context, class_context, args.scale)
        summary = result["runs"][path]
        print(f"{path}: eps MSE {summary['mse']['all quantized']:.4f}, guided {summary['guided']['mse_guided']:.4f}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
