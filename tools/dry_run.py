"""Plan a real-scale LDM/SD quantization run without the weights: sizes, distillation memory and time.

    python tools/dry_run.py --config configs/stable-diffusion/v1-inference.yaml --cali_n 512
    python tools/dry_run.py --config configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml \\
        configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml configs/latent-diffusion/cin256-v2.yaml \\
        configs/stable-diffusion/v1-inference.yaml --out results/ldm_dry_run.md

Per config, the full-size UNet is built on the `meta` device (shapes only, no memory) and wrapped as DilateQuant
wraps it (W4A4, TPQ over the sampler's steps, split); one meta forward of one sample (with its context: 77
CLIP tokens for SD, one token for a ClassEmbedder, none for unconditional models) gives every distillation
unit's per-sample input and output shapes (quant.unit_cache). Reported: parameters, quantized and FP weight
layers, model size at FP32 and the --bits (tools/model_cost.py; first and last layer at 8 bits), the unit with
the largest cache (inputs + FP targets of --cali_n samples) in float32 and float16, and

    peak ≈ FP UNet + quantized UNet + max over units (its cache + its initial state, kept by train_unit
           + its gradients and Adam's two moments: 3 x its trained parameters)

(float32 parameters; autograd's tensors and the iteration's temporaries, which grow with the training batch, come
on top; the timing below measures them at --time_batch). Then, unless --no_time, only the largest unit is materialised
on the CPU with random weights (quantizer ranges from the weights, activations in [-4, 4], softmax in [0, 1])
and one distillation iteration (forward at mixed timesteps, MSE, backward, Adam step) is timed at
--time_batch: the median of --time_iters after one warm-up, with a linear extrapolation to the paper's batch 32.

Calibration sizes and steps default to the paper's (SPEC §9) for the four public configs.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.errors import UsageError  # noqa: E402
from diffusion.samplers import ddim_timesteps  # noqa: E402
from ldm.util import instantiate_from_config, load_config  # noqa: E402
from quant.distill import DistillConfig, unit_param_groups  # noqa: E402
from quant.layers import QuantLayer, QuantMatMul  # noqa: E402
from quant.model import QuantModel, quant_enabled  # noqa: E402
from quant.quantizer import ActQuantizer  # noqa: E402
from quant.settings import QuantConfig, Signedness  # noqa: E402
from quant.unit_cache import GB, CachePolicy, per_sample_shapes, plan  # noqa: E402
from tools.common import parse_bits  # noqa: E402
from tools.model_cost import cost, count_macs  # noqa: E402
from tools.smoke_run import StageMemory  # noqa: E402


@dataclass(frozen=True)
class Paper:
    cali_n: int      # calibration samples (SPEC §9)
    steps: int       # sampler steps: the TPQ schedule


PAPER = {"lsun_bedrooms-ldm-vq-4": Paper(5120, 100), "lsun_churches-ldm-kl-8": Paper(5120, 100),
         "cin256-v2": Paper(1024, 20), "v1-inference": Paper(512, 50)}
PAPER_BATCH = 32
TRAINING_COPIES = 3      # gradients, Adam's two moments: float32 copies of a unit's trained parameters


def build_unet(config: dict) -> nn.Module:
    """The config's UNet on the meta device: every shape, no storage."""
    with torch.device("meta"):
        return instantiate_from_config(config["model"]["params"]["unet_config"]).eval()


def network_inputs(config: dict, unet: nn.Module, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x, t, cond) of one network call on the meta device: latents [B, C, H, W], t [B], and for a
    cross-attention UNet its context [B, tokens, context_dim] (CLIP: max_length tokens; ClassEmbedder: 1)."""
    p = config["model"]["params"]
    size = int(p.get("image_size", unet.image_size))
    x = torch.zeros(batch, unet.in_channels, size, size, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    cond_stage = p.get("cond_stage_config")
    context_dim = p["unet_config"]["params"].get("context_dim")
    if context_dim is None:
        return x, t, {}
    target = cond_stage.get("target", "") if isinstance(cond_stage, dict) else ""
    tokens = 1 if target.endswith("ClassEmbedder") else int((cond_stage.get("params") or {}).get("max_length", 77))
    return x, t, {"context": torch.zeros(batch, tokens, context_dim, device="meta")}


def nbytes(tensors) -> int:
    return sum(v.numel() * v.element_size() for v in tensors)


def describe(config_path: Path, cali_n: int, steps: int, bits: list[tuple[int, int]]) -> tuple[dict, dict]:
    """The meta-device facts of one config -> (report row, what timing needs)."""
    config = load_config(config_path)
    unet = build_unet(config)
    num_timesteps = int(config["model"]["params"].get("timesteps", 1000))
    if not 1 <= steps <= num_timesteps:
        raise UsageError(f"--steps {steps} is out of range for {config_path.name}: use 1..{num_timesteps}")
    q = QuantModel(unet, QuantConfig(weight_bit=4, act_bit=4, temporal=True, split=True),
                   ddim_timesteps(steps, num_timesteps))
    units = q.adapter.units(q.model)
    x, t, cond = network_inputs(config, unet)
    calls = {}
    hooks = [q.model.get_submodule(u).register_forward_pre_hook(
        lambda mod, args, kwargs, u=u: calls.__setitem__(u, (args, kwargs)), with_kwargs=True) for u in units]
    try:
        with quant_enabled(q, weight=False, act=False):                  # shapes only: no ranges needed
            shapes = per_sample_shapes(q.model, lambda: q(x, t, **cond), units)
    finally:
        for h in hooks:
            h.remove()
    caches = {dtype: {p.unit: p.bytes for p in plan(shapes, cali_n, CachePolicy(dtype))}
              for dtype in (torch.float32, torch.float16)}
    largest = max(units, key=lambda u: caches[torch.float32][u])
    trained = {u: sum(p.numel() for g in unit_param_groups(q.model.get_submodule(u), DistillConfig())
                      for p in g["params"]) for u in units}
    states = {u: nbytes(v for v in q.model.get_submodule(u).state_dict().values() if v is not None) for u in units}
    # while a unit trains: its cache, the copy of its initial state train_unit keeps, its gradients and Adam's two
    # moments (float32); autograd's tensors come on top (measured by time_unit)
    training = {u: states[u] + TRAINING_COPIES * 4 * trained[u] for u in units}
    held = {d: {u: caches[d][u] + training[u] for u in units} for d in caches}
    peak_unit = max(units, key=lambda u: held[torch.float32][u])
    macs = count_macs(unet, x, t, **cond)
    fp_bytes = nbytes(unet.parameters())
    q_bytes = nbytes(q.parameters()) + nbytes(b for b in q.buffers() if b is not None)
    base = fp_bytes + q_bytes
    row = {"config": config_path.stem, "path": str(config_path), "cali_n": cali_n, "steps": steps,
           "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
           "weight_layers": sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in unet.modules()),
           "quant_layers": sum(1 for _ in q.quant_layers()),
           "matmuls": sum(isinstance(m, QuantMatMul) for m in q.model.modules()),
           "unquantized": list(q.unquantized), "units": units,
           "context": {k: tuple(v.shape[1:]) for k, v in cond.items()},
           "gmacs": sum(n for _, n in macs.values()) / 1e9,
           "size_mb": {f"W{w}A{a}": cost(unet, macs, w, a)["size_mb"] for w, a in [(32, 32)] + bits},
           "largest": largest, "largest_shapes": [s for s, _ in shapes[largest]],
           "largest_trained_m": trained[largest] / 1e6,
           "cache_gb": {str(d).removeprefix("torch."): caches[d][largest] / GB for d in caches},
           "peak_unit": peak_unit, "peak_unit_trained_m": trained[peak_unit] / 1e6,
           "training_gb": training[peak_unit] / GB,
           "fp_gb": fp_bytes / GB, "quant_gb": q_bytes / GB,
           "peak_gb": {str(d).removeprefix("torch."): (base + max(held[d].values())) / GB for d in caches}}
    timing = {"qmodel": q, "units": {u: {"call": calls[u], "out_shape": shapes[u][-1][0],
                                         "held_gb": {str(d).removeprefix("torch."): held[d][u] / GB for d in held}}
                                     for u in dict.fromkeys([largest, peak_unit])},
              "base_gb": base / GB}
    return row, timing


@torch.no_grad()
def materialize(unit: nn.Module, seed: int = 0) -> None:
    """Give a meta unit CPU storage and plausible values: weights N(0, 1/fan_in), norms reset, quantizer ranges
    from the weights, activation ranges [-4, 4] ([0, 1] for softmax operands), all quantizers calibrated."""
    gen = torch.Generator().manual_seed(seed)
    unit.to_empty(device="cpu")
    for m in unit.modules():
        if isinstance(m, QuantLayer):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                m.bias.zero_()
            m.in_scale.fill_(1.0)
            w = m.weight.flatten(1)
            m.w_quant.set_range(w.amin(1), w.amax(1))
        elif isinstance(m, ActQuantizer):
            n = m.delta.numel()
            lo = 0.0 if m.spec.signedness is Signedness.UNSIGNED else -4.0
            hi = 1.0 if m.spec.signedness is Signedness.UNSIGNED else 4.0
            m.set_range(torch.full((n,), lo), torch.full((n,), hi))
        elif hasattr(m, "reset_parameters") and not isinstance(m, QuantMatMul):
            m.reset_parameters()
    bad = [k for k, v in unit.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise RuntimeError(f"materialize left uninitialised values in {bad[:3]}: add an initialiser for them")


def time_unit(q: QuantModel, name: str, call: tuple, out_shape: tuple, batch: int, iters: int,
              seed: int = 0) -> dict:
    """Seconds per distillation iteration of unit `name` at `batch` (median of `iters` after one warm-up), the
    bytes autograd saves for backward in one iteration (distinct storages), and what the iterations added to the
    process's resident peak beyond the gradients and Adam's moments (transient_gb: autograd's tensors, the
    quantized weights and every temporary of forward and backward; Linux /proc)."""
    unit = q.model.get_submodule(name)
    materialize(unit, seed)
    gen = torch.Generator().manual_seed(seed)

    def like(v):
        return torch.randn((batch, *v.shape[1:]), generator=gen) if torch.is_tensor(v) else v

    args, kwargs = call
    args, kwargs = [like(a) for a in args], {k: like(v) for k, v in kwargs.items()}
    target = torch.randn((batch, *out_shape), generator=gen)
    slots = torch.randint(0, q.slots.num_slots, (batch,), generator=gen)     # a mixed-timestep batch
    opt = torch.optim.Adam(unit_param_groups(unit, DistillConfig()))
    saved: dict[int, int] = {}

    def pack(v):
        saved[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        return v

    def step(record: bool = False) -> float:
        start = time.perf_counter()
        with q.slots.active(slots), torch.autograd.graph.saved_tensors_hooks(pack if record else (lambda v: v),
                                                                            lambda v: v):
            loss = F.mse_loss(unit(*args, **kwargs), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    memory = StageMemory(0.0)
    with memory.stage("training"):
        step(record=True)                                                    # warm-up
        seconds = statistics.median(step() for _ in range(iters))
    (grown,) = (r["peak_gb"] - r["rss_before_gb"] for r in memory.records)
    grads_and_adam = TRAINING_COPIES * 4 * sum(p.numel() for g in opt.param_groups for p in g["params"])
    return {"batch": batch, "iters": iters, "seconds": seconds, "saved_gb": sum(saved.values()) / GB,
            "seconds_32": seconds * PAPER_BATCH / batch, "transient_gb": max(0.0, grown - grads_and_adam / GB)}


def paper_setting(path: Path, given: int | None, what: str) -> int:
    if given is not None:
        return given
    if path.stem not in PAPER:
        raise UsageError(f"{path} is not one of the public configs {sorted(PAPER)}: no paper default for --{what}",
                         f"pass --{what}")
    return getattr(PAPER[path.stem], what)


def per_config(values: list[int] | None, n: int, flag: str) -> list[int | None]:
    if values is None:
        return [None] * n
    if len(values) not in (1, n):
        raise UsageError(f"--{flag} takes one value or one per --config ({n}), got {len(values)}")
    bad = [v for v in values if v < 1]
    if bad:
        raise UsageError(f"--{flag} {bad[0]} is out of range: use >= 1")
    return values * n if len(values) == 1 else values


def gb(v: float) -> str:
    return f"{v:.2f}"


def markdown(rows: list[dict], command: str, machine: str | None) -> str:
    bits = list(rows[0]["size_mb"])
    lines = ["# LDM/SD quantization plan at full size (dry run, no weights)", "", f"    {command}", "",
             "Full-size UNets built on the meta device and wrapped as DilateQuant wraps them (W4A4, TPQ over the "
             "sampler's steps, split shortcut); shapes from one meta forward of one sample. Sizes in MB = 10^6 bytes "
             "(tools/model_cost.py: first and last layer at 8 bits, biases and norms at 32); memory in GB = 2^30 "
             "bytes.", "",
             "| config | UNet params (M) | conv+linear layers | quantized layers | attention matmuls | "
             "unquantized weight layers | units | GMACs / call | " + " | ".join(f"size {b} (MB)" for b in bits) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(bits)]
    for r in rows:
        lines.append(f"| {r['config']} | {r['params_m']:.2f} | {r['weight_layers']} | {r['quant_layers']} | "
                     f"{r['matmuls']} | {len(r['unquantized'])} | {len(r['units'])} | {r['gmacs']:.1f} | "
                     + " | ".join(f"{r['size_mb'][b]:.1f}" for b in bits) + " |")
    lines += ["", "Distillation memory: peak ≈ FP UNet + quantized UNet + max over units of what training one unit "
              "holds: its cache (inputs from the quantized chain and FP targets of every calibration sample), the "
              "copy of its initial state train_unit keeps, and its gradients and Adam's two moments (3 x its "
              "trained parameters, float32). The peak unit is the one with the most; at the paper's calibration "
              "sizes that is the largest cache. Autograd's tensors and the iteration's temporaries at the "
              "training batch come on top (measured below at the timing batch).", "",
              "| config | cali_n | TPQ steps | largest unit (by cache) | its per-sample inputs -> output | "
              "cache fp32 (GB) | cache fp16 (GB) | peak unit | its trained params (M) | its state + gradients + "
              "Adam (GB) | FP UNet (GB) | quantized UNet (GB) | peak, fp32 cache (GB) | peak, fp16 cache (GB) |",
              "|---" * 14 + "|"]
    for r in rows:
        shapes = ", ".join("x".join(map(str, s)) for s in r["largest_shapes"][:-1]) + " -> " + \
            "x".join(map(str, r["largest_shapes"][-1]))
        lines.append(f"| {r['config']} | {r['cali_n']} | {r['steps']} | {r['largest']} | {shapes} | "
                     f"{gb(r['cache_gb']['float32'])} | {gb(r['cache_gb']['float16'])} | {r['peak_unit']} | "
                     f"{r['peak_unit_trained_m']:.2f} | {gb(r['training_gb'])} | {gb(r['fp_gb'])} | "
                     f"{gb(r['quant_gb'])} | {gb(r['peak_gb']['float32'])} | {gb(r['peak_gb']['float16'])} |")
    timed = [r for r in rows if r.get("time")]
    if timed:
        lines += ["", f"Distillation time of the largest unit, MEASURED on the CPU ({machine}): one iteration = "
                  "forward at mixed timesteps, MSE, backward, Adam step, random weights; median of the timed "
                  "iterations after one warm-up. Columns marked 'extrapolated' are LINEAR EXTRAPOLATIONS from the "
                  "measured batch to the paper's batch 32 (not measured); the 5K-iteration total uses the paper's "
                  "5K iterations per unit.", "",
                  "| config | unit | batch | iterations timed | s / iteration (measured) | autograd saved tensors "
                  "(GB, measured) | s / iteration at batch 32 (extrapolated) | 5K iterations at batch 32 (h, "
                  "extrapolated) | saved tensors at batch 32 (GB, extrapolated) | peak at batch 32, fp16 cache (GB, "
                  "extrapolated) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in timed:
            tm = r["time"]
            saved_32 = tm["saved_gb"] * PAPER_BATCH / tm["batch"]
            lines.append(f"| {r['config']} | {r['largest']} | {tm['batch']} | {tm['iters']} | {tm['seconds']:.2f} | "
                         f"{tm['saved_gb']:.2f} | {tm['seconds_32']:.1f} | {tm['seconds_32'] * 5000 / 3600:.1f} | "
                         f"{saved_32:.1f} | {r['peak_gb']['float16'] + saved_32:.1f} |")
    return "\n".join(lines) + "\n"


def machine_note() -> str:
    """Threads used, and whether other jobs shared the CPU (the 1-minute load average counts this process too)."""
    threads, load = torch.get_num_threads(), os.getloadavg()[0]
    shared = "shared with other jobs" if load > threads + 0.5 else "not visibly shared"
    return (f"torch {torch.__version__}, {threads} thread(s) of {os.cpu_count()} cores; 1-minute load average "
            f"{load:.2f} when timing started: {shared}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", required=True, help="LDM/SD configs (YAML)")
    p.add_argument("--cali_n", type=int, nargs="+", default=None,
                   help="calibration samples: one for all configs or one per config (default: the paper's, "
                        "bedroom/church 5120, cin256-v2 1024, SD v1 512)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="sampler steps, the TPQ schedule (default: the paper's, 100 / 100 / 20 / 50)")
    p.add_argument("--bits", nargs="+", default=["6/6", "4/4"], help="W/A pairs for the model size")
    p.add_argument("--time_batch", type=int, default=2, help="batch of the timed distillation iterations")
    p.add_argument("--time_iters", type=int, default=3, help="timed iterations (after one warm-up)")
    p.add_argument("--no_time", action="store_true", help="shapes and memory only (no timing)")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--smoke", nargs="*", default=None, metavar="CONFIG",
                   help="also run tools/smoke_run.py on each config (random full-size weights; DilateQuant W4A4 and "
                        "Q-Diffusion W4A8), each in its own process, and set its measured peak memory and seconds per "
                        "iteration next to this plan's for the same settings (a long run on a CPU); with CONFIGs, on "
                        "those of --config only")
    p.add_argument("--smoke_dir", default="runs/smoke", help="where the smoke runs write their units and records")
    return p


SMOKE = dict(cali_n=4, steps=2, batch=2, iters=2)        # tools/smoke_run.py's defaults: what its runs are planned at
TOLERANCE = 0.25                                         # measured / planned within 25%


def smoke_against_plan(path: Path, out: Path) -> dict:
    """Each method's smoke run of `path` (its own process: a clean peak; a record of a finished run at these
    settings under `out` is reused, so an interrupted --smoke resumes), and this plan at the same settings:
    peak = the planned peak with a float32 cache + the autograd tensors measured at the run's batch; seconds per
    BKD iteration of the largest unit at that batch."""
    import json
    import subprocess
    row, timing = describe(path, SMOKE["cali_n"], SMOKE["steps"], [(4, 4)])
    measured = {u: time_unit(timing["qmodel"], u, info["call"], info["out_shape"], SMOKE["batch"], 3)
                for u, info in timing["units"].items()}
    held = {u: timing["base_gb"] + info["held_gb"]["float32"] + measured[u]["transient_gb"]
            for u, info in timing["units"].items()}
    peak_unit = max(held, key=held.get)
    result = {"config": path.stem, "largest": row["largest"], "planned_peak_unit": peak_unit,
              "planned_peak_gb": held[peak_unit], "planned_transient_gb": measured[peak_unit]["transient_gb"],
              "planned_seconds": measured[row["largest"]]["seconds"], "runs": {}}
    for method in ("dilatequant", "qdiff"):
        record = out / f"{path.stem}_{method}.json"
        done = json.loads(record.read_text()) if record.exists() else None
        if done is not None and all(done.get(k) == v for k, v in SMOKE.items()) and done.get("method") == method:
            print(f"[dry_run] smoke run of {path.name} ({method}): finished before, reusing {record}", flush=True)
            result["runs"][method] = done
            continue
        cmd = [sys.executable, str(Path(__file__).with_name("smoke_run.py")), "--config", str(path), "--method",
               method, "--out", str(out / f"{path.stem}_{method}"), "--json", str(record),
               *[a for k, v in SMOKE.items() for a in (f"--{k}", str(v))]]
        print(f"[dry_run] smoke run: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode:
            raise RuntimeError(f"the smoke run of {path.name} ({method}) failed: its error is above")
        result["runs"][method] = json.loads(record.read_text())
    return result


def smoke_markdown(smokes: list[dict], machine: str) -> str:
    def ratio(measured, planned):
        return "" if measured is None else f"{measured / planned:.2f}"
    lines = ["", f"Full-size smoke runs with random weights (`--smoke`: tools/smoke_run.py, {SMOKE['cali_n']} calibration "
             f"samples from guided FP trajectories of {SMOKE['steps']} DDIM steps, {SMOKE['iters']} iterations per unit "
             f"at batch {SMOKE['batch']}, save, reload, one image sampled and decoded), MEASURED on the CPU ({machine}), "
             f"next to this plan for the same settings. Measured peak: the process's resident high-water mark during "
             f"quantization, less what was resident before, plus the FP UNet (as the plan counts it). Planned peak: "
             f"the memory plan above at these settings, plus the temporaries of training the peak unit at batch "
             f"{SMOKE['batch']} (autograd's tensors, quantized weights, forward and backward buffers: measured by "
             f"training that unit alone, as the growth of the resident peak beyond its gradients and Adam's "
             f"moments). Seconds per iteration: BKD on the largest unit (by cache), measured in the run against "
             f"the plan's timing of that unit alone. Q-Diffusion's passes (AdaRound, activation steps) are not "
             f"what the plan models: its peak is listed against the same plan.", "",
             "| config | method | peak unit (planned) | temporaries (GB, measured alone) | peak measured (GB) | "
             "peak planned (GB) | measured / planned | largest unit | s / iteration measured | "
             "s / iteration planned | measured / planned | quantization s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sm in smokes:
        for method, r in sm["runs"].items():
            it = r["seconds_per_iteration"]
            lines.append(f"| {sm['config']} | {method} | {sm['planned_peak_unit']} | "
                         f"{sm['planned_transient_gb']:.2f} | {r['quantization_peak_gb']:.2f} | "
                         f"{sm['planned_peak_gb']:.2f} | {ratio(r['quantization_peak_gb'], sm['planned_peak_gb'])} | "
                         f"{sm['largest']} | {'' if it is None else f'{it:.2f}'} | {sm['planned_seconds']:.2f} | "
                         f"{ratio(it, sm['planned_seconds'])} | {r['quantization_seconds']:.0f} |")
    staged = [(sm["config"], method, r) for sm in smokes for method, r in sm["runs"].items() if r.get("stages")]
    if staged:
        lines += ["", "Where the measured peak comes from: each stage's resident high-water mark (tools/smoke_run.py "
                  "StageMemory), counted as above (less what was resident before the run, plus the FP UNet), and "
                  "what stayed resident after it.", "",
                  "| config | method | stage | seconds | peak (GB) | resident after (GB) |", "|---|---|---|---|---|---|"]
        for config, method, r in staged:
            for st in r["stages"]:
                lines.append(f"| {config} | {method} | {st['stage']} | {st['seconds']:.0f} | "
                             f"{st['peak_gb'] + r['fp_unet_gb']:.2f} | {st['rss_after_gb'] + r['fp_unet_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.time_batch < 1 or args.time_iters < 1:
        raise UsageError("--time_batch and --time_iters must be >= 1")
    bits = [parse_bits(b) for b in args.bits]
    paths = [Path(c) for c in args.config]
    cali = per_config(args.cali_n, len(paths), "cali_n")
    steps = per_config(args.steps, len(paths), "steps")
    rows, machine = [], None
    for path, n, s in zip(paths, cali, steps):
        row, timing = describe(path, paper_setting(path, n, "cali_n"), paper_setting(path, s, "steps"), bits)
        if not args.no_time:
            machine = machine or machine_note()
            info = timing["units"][row["largest"]]
            row["time"] = time_unit(timing["qmodel"], row["largest"], info["call"], info["out_shape"],
                                    args.time_batch, args.time_iters)
        rows.append(row)
        print(f"[dry_run] {row['config']}: {row['params_m']:.2f} M parameters, largest unit {row['largest']} "
              f"({row['cache_gb']['float32']:.2f} GB cache)", flush=True)
    text = markdown(rows, "python tools/dry_run.py " + " ".join(shlex.quote(a) for a in argv), machine)
    if args.smoke is not None:
        chosen = {Path(c).resolve() for c in args.smoke} or {p.resolve() for p in paths}
        unknown = sorted(str(c) for c in chosen - {p.resolve() for p in paths})
        if unknown:
            raise UsageError(f"--smoke {unknown[0]} is not one of the --config files")
        smokes = [smoke_against_plan(path, Path(args.smoke_dir)) for path in paths if path.resolve() in chosen]
        skipped = [path.stem for path in paths if path.resolve() not in chosen]
        text += smoke_markdown(smokes, machine_note()) + (
            f"\nNo smoke run in this file for: {', '.join(skipped)}.\n" if skipped else "")
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return rows


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
