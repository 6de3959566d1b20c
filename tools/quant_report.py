"""Quantization diagnostics on a model: eps SQNR vs FP, Weight Dilation statistics (paper Table 8),
and fake-quant vs FP forward time with a profile of what dominates.

    python tools/quant_report.py --config configs/mnist.yml --out results/mnist_quant_report.json

SQNR = 10 log10(E[eps_fp^2] / E[(eps_q - eps_fp)^2]) on held-out (x_t, t) from FP trajectories (other
noise seeds than calibration), averaged over all sampling steps, and per timestep band; small t dominates
the eps SQNR while mattering little to the images, so the SQNR of the final samples (same noise, FP vs
quantized sampler) is reported too, and which activation quantizer alone costs the most eps SQNR.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.files import write_json  # noqa: E402
from ddim import load_config, make_betas  # noqa: E402
from ddim.checkpoint import load_unet  # noqa: E402
from ddim.sampling import make_sampler  # noqa: E402
from diffusion.sampling import initial_noise  # noqa: E402
from quant.calib_data import CalibSet, draw_over_steps, to_device, trajectories_for  # noqa: E402
from quant.calibrate import calibrate  # noqa: E402
from quant.dilation import dilate  # noqa: E402
from quant.model import QuantModel, quant_enabled  # noqa: E402
from quant.quantizer import range_to_params  # noqa: E402
from quant.range_search import init_range, init_weight_quantizers  # noqa: E402
from quant.settings import QuantConfig  # noqa: E402
from common.device import pick_device, set_seed  # noqa: E402
from tools.common import parse_bits  # noqa: E402


def draw(fp, sample, n: int, seed: int, shape, per_traj: int = 1, gen_seed: int | None = None) -> CalibSet:
    """n (x_t, t) at random steps of FP trajectories started from noise `seed`, per_traj from each; the steps
    are picked with generator `gen_seed` (default: `seed`)."""
    x_T = initial_noise(trajectories_for(n, per_traj), shape, seed)
    device = next(fp.parameters()).device
    return draw_over_steps(lambda x, on_step, rows=None: sample(fp, x.to(device), on_step=on_step), x_T, n,
                           len(sample.seq), per_traj,
                           torch.Generator().manual_seed(seed if gen_seed is None else gen_seed))


def add_setup_args(p: argparse.ArgumentParser, cali_n: int) -> None:
    p.add_argument("--config", default="configs/mnist.yml")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--timesteps", type=int, default=100)
    p.add_argument("--skip_type", default="quad")
    p.add_argument("--cali_n", type=int, default=cali_n)
    p.add_argument("--cali_per_traj", type=int, default=1, help="calibration samples per FP trajectory")
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def load_model(config: str, ckpt: str | None, timesteps: int, skip_type: str, device: str | None = None):
    """(FP model on `device`, DDIM sampler with eta 0, image shape) of a model config and checkpoint."""
    cfg = load_config(config)
    fp = load_unet(cfg, ckpt).to(pick_device(device))
    sample = make_sampler(make_betas(cfg.diffusion), timesteps, skip_type, 0.0)
    return fp, sample, (cfg.channels, cfg.image_size, cfg.image_size)


def load_setup(args):
    """(FP model, sampler, held-out set, image shape): 512 held-out samples at random steps of 512 FP
    trajectories of their own noise seed."""
    set_seed(args.seed)
    fp, sample, shape = load_model(args.config, args.ckpt, args.timesteps, args.skip_type, args.device)
    return fp, sample, draw(fp, sample, 512, 200 + args.seed, shape), shape


def setup(args):
    """(FP model, sampler, calibration set, held-out set): both sets drawn at random over all steps of
    FP trajectories, from different noise seeds."""
    fp, sample, held, shape = load_setup(args)
    return fp, sample, draw(fp, sample, args.cali_n, 100 + args.seed, shape, args.cali_per_traj), held


@torch.no_grad()
def sqnr_db(fp, qmodel, data: CalibSet, batch: int = 128) -> float:
    sig = err = 0.0
    device = next(fp.parameters()).device
    for x, t, cond in data.batches(batch, device):
        ref = fp(x, t, **cond)
        sig += float(ref.pow(2).sum())
        err += float((qmodel(x, t, **cond) - ref).pow(2).sum())
    return 10 * torch.log10(torch.tensor(sig / err)).item()


def _channels_first(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """[C_in, m]: the in-channel dim (1 for convs, last for linears) first, the rest flattened."""
    return x.transpose(0, 1 if conv else x.dim() - 1).reshape(x.shape[1 if conv else -1], -1)


T_BANDS = ((0, 10), (10, 100), (100, 10 ** 9))


def t_bands(t: torch.Tensor):
    """(label, mask over t) for each band of T_BANDS that holds any of the timesteps `t`."""
    for lo, hi in T_BANDS:
        sel = (t >= lo) & (t < hi)
        if sel.any():
            yield f"t in [{lo}, {hi if hi < 10 ** 9 else 'T'})", sel


def sqnr_by_t(fp, qmodel, data: CalibSet) -> dict[str, float]:
    """eps SQNR per timestep band: small t dominates the overall number, since eps = (x_t - sqrt(a_t) x_0) /
    sqrt(1 - a_t) turns an input error into an eps error 1/sqrt(1 - a_t) (~100 at t = 0) times larger."""
    return {label: sqnr_db(fp, qmodel, data.subset(sel)) for label, sel in t_bands(data.t)}


def tensor_sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """SQNR of `out` against `ref`, e.g. final samples (x_0 in [-1, 1]) of FP and quantized models from the
    same noise: what reaches the images."""
    return 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()).item()


@torch.no_grad()
def one_quantizer_at_a_time(fp, qmodel: QuantModel, data: CalibSet, top: int = 8) -> list[dict]:
    """eps SQNR with only one module's activation quantizers on (weights FP), lowest first."""
    rows = []
    with quant_enabled(qmodel, weight=False, act=False):
        for name, module in qmodel.act_quant_modules():
            module.quant_act = True
            rows.append({"module": name, "sqnr_db": sqnr_db(fp, qmodel, data)})
            module.quant_act = False
    return sorted(rows, key=lambda r: r["sqnr_db"])[:top]


@torch.no_grad()
def layer_inputs(qmodel: QuantModel, data: CalibSet) -> dict[str, torch.Tensor]:
    """X/s as each QuantLayer's activation quantizer sees it, on one batch, as [C_in, m]."""
    seen, hooks = {}, []
    for name, layer in qmodel.quant_layers():
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, name=name: seen.__setitem__(name, _channels_first(m.quantizer_input(a[0]), bool(m.conv_args)))))
    with quant_enabled(qmodel, weight=False, act=False):
        device = next(qmodel.parameters()).device
        qmodel(data.x.to(device), data.t.to(device), **to_device(data.cond, device))
    for h in hooks:
        h.remove()
    return seen


def clip_stats(x: torch.Tensor, config: QuantConfig) -> tuple[float, float]:
    """(Δ_x, E_clip) of an MSE-searched per-tensor quantizer on x [C, m]; E_clip = sum of squared clipping."""
    x, spec = x.flatten()[None], config.act_spec()
    lo, hi = init_range(x, spec)
    delta, zero = range_to_params(lo, hi, spec)
    lo_q, hi_q = delta * (spec.qmin - zero), delta * (spec.qmax - zero)
    e_clip = (x - x.clamp(float(lo_q), float(hi_q))).pow(2).sum()
    return float(delta), float(e_clip)


def dilation_stats(fp, config: QuantConfig, data: CalibSet) -> dict:
    """Table 8: Δ'_w/Δ_w, E'_clip/E_clip, fraction of in-channels with s > 1, Δ'_x/Δ_x (means over layers).

    Why Δ_x moves little: a per-tensor range shrinks only if the in-channels holding the tensor's max and
    min are dilated. `range_ch_protected` is the fraction of layers where both have s = 1 (set A or no
    room), `range_ratio` the min-max range of X/s over that of X."""
    plain, dilated = QuantModel(fp, config), QuantModel(fp, config)
    scales = dilate(dilated)
    init_weight_quantizers(plain)
    init_weight_quantizers(dilated)
    x_plain, x_dil = layer_inputs(plain, data), layer_inputs(dilated, data)
    rows = []
    for (name, a), (_, b) in zip(plain.quant_layers(), dilated.quant_layers()):
        x, s = x_plain[name], scales[name]
        (dx, ec), (dx2, ec2) = clip_stats(x, config), clip_stats(x_dil[name], config)
        k_max, k_min = int(x.amax(1).argmax()), int(x.amin(1).argmin())
        rows.append({"layer": name, "dw_ratio": float((b.w_quant.delta / a.w_quant.delta).mean().detach()),
                     "eclip_ratio": ec2 / ec if ec > 0 else float("nan"), "frac_s_gt_1": float((s > 1).float().mean()),
                     "dx_ratio": dx2 / dx, "range_ratio": float((x_dil[name].max() - x_dil[name].min()) / (x.max() - x.min())),
                     "s_at_max_ch": float(s[k_max]), "s_at_min_ch": float(s[k_min]),
                     "range_ch_protected": float(s[k_max] == 1 and s[k_min] == 1)})
    mean = lambda k: float(torch.tensor([r[k] for r in rows]).nanmean())  # noqa: E731
    keys = ("dw_ratio", "eclip_ratio", "frac_s_gt_1", "dx_ratio", "range_ratio", "range_ch_protected")
    return {"mean": {k: mean(k) for k in keys}, "layers": rows}


@torch.no_grad()
def forward_times(fp, qmodel, x, t, repeats: int = 5) -> dict:
    def clock(f):
        f()
        start = time.perf_counter()
        for _ in range(repeats):
            f()
        return (time.perf_counter() - start) / repeats
    fp_s, q_s = clock(lambda: fp(x, t)), clock(lambda: qmodel(x, t))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        qmodel(x, t)
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    return {"batch": x.shape[0], "fp_ms": 1e3 * fp_s, "fakequant_ms": 1e3 * q_s, "ratio": q_s / fp_s, "profile": top}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(p, cali_n=512)
    p.add_argument("--bits", nargs="+", default=["8/8", "4/4"])
    p.add_argument("--sample_n", type=int, default=32, help="images sampled per setting for the sample SQNR")
    args = p.parse_args(argv)
    fp, sample, calib, held = setup(args)
    report = {"config": args.config, "timesteps": args.timesteps, "cali_n": args.cali_n, "sqnr_db": {}}
    x_T = initial_noise(args.sample_n, (fp.cfg.in_channels, fp.cfg.resolution, fp.cfg.resolution),
                        300 + args.seed).to(next(fp.parameters()).device)
    with torch.no_grad():
        fp_samples = sample(fp, x_T)
    report |= {"sqnr_db_by_t": {}, "sample_sqnr_db": {}, "sample_n": args.sample_n}
    for bits in args.bits:
        w, a = parse_bits(bits)
        config = QuantConfig(weight_bit=w, act_bit=a)
        for label, temporal, wd in (("shared", False, False), ("tpq", True, False), ("wd+tpq", True, True)):
            q = QuantModel(fp, QuantConfig(weight_bit=w, act_bit=a, temporal=temporal), sample.seq)
            if wd:
                dilate(q)
            calibrate(q, calib)
            key = f"W{w}A{a} {label}"
            report["sqnr_db"][key] = sqnr_db(fp, q, held)
            report["sqnr_db_by_t"][key] = sqnr_by_t(fp, q, held)
            with torch.no_grad():
                report["sample_sqnr_db"][key] = tensor_sqnr_db(fp_samples, sample(q, x_T))
            print(f"{key:14s} eps SQNR {report['sqnr_db'][key]:.2f} dB", report["sqnr_db_by_t"][key],
                  f"sample SQNR {report['sample_sqnr_db'][key]:.2f} dB", flush=True)
            if label == "shared" and bits == args.bits[0]:
                report[f"{key}: one activation quantizer at a time"] = one_quantizer_at_a_time(fp, q, held)
                print(report[f"{key}: one activation quantizer at a time"][:3], flush=True)
        if bits == args.bits[-1]:
            report[f"dilation W{w}A{a}"] = dilation_stats(fp, config, held.subset(torch.arange(min(128, len(held.t)))))
            print("Table 8 (means over layers):", report[f"dilation W{w}A{a}"]["mean"], flush=True)
            device = next(fp.parameters()).device
            x, t = held.x[:100].to(device), held.t[:100].to(device)
            report["timing"] = forward_times(fp, q, x, t)
            print({k: v for k, v in report["timing"].items() if k != "profile"})
            print(report["timing"]["profile"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report)


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
