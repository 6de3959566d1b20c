"""Speed and size of a diffusion UNet as FP32, BF16 autocast, fake-quantized (the simulation) and integer (the
`--backend int` of the sampling scripts) side by side in one run, on any device.

    python tools/bench_sampling.py --config configs/mnist.yml --batch 250 --rounds 5 --sample 1000 --sizes
    python tools/bench_sampling.py --config configs/cifar10.yml --random_weights --batch 64 --rounds 3 --sizes
    python tools/bench_sampling.py --config configs/latent-diffusion/mnist-ldm-kl-4.yaml --batch 250 --rounds 5

A DDIM config (configs/*.yml) benches its UNet on noise over a 100-step quad schedule; an LDM config its UNet
under classifier-free guidance (two network rows per image: the unconditional and the conditional half, as the
guided sampler calls it) over its DDIM schedule (--steps). Quantized twins (W8A8, W4A4 TPQ and, integer only,
W4A8) are calibrated on one noise input per timestep: only their speed and size are meaningful here (the
calibrated models' images: configs/tasks/mnist.yml and mnist_ldm.yml, the *_int runs). Fake rows run as the
sampling scripts run them (weights quantized once, quant.model.frozen); integer rows are quant.deploy.convert'ed
(oneDNN int8 on the CPU, torch._int_mm elsewhere; 4-bit operands on int8 units in the 4-bit range: no int4
multiply-accumulate exists on this CPU). Times are ms per image per network call (one sampling step): the median
of --repeats forwards after --warmup ones (the integer rows' first calls also compile their quantize step);
with --rounds R every row is timed R times in rotation and the table holds medians, the ratio to FP32 as the
median of each round's ratio. --sample N adds end-to-end seconds to sample N images with the FP32, fake W4A4
and integer W4A4 models (same sampler; an LDM's include its decoder). --sizes writes the FP32 checkpoint, each
twin's quantized.pt and its packed integer file, and reports their sizes on disk. --out writes JSON.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from common.device import pick_device  # noqa: E402
from common.files import read_yaml, write_json  # noqa: E402
from quant.calib_data import CalibSet  # noqa: E402
from quant.calibrate import calibrate  # noqa: E402
from quant.checkpoint import save_quantized  # noqa: E402
from quant.deploy import convert, save_int  # noqa: E402
from quant.model import QuantModel, frozen  # noqa: E402
from quant.settings import QuantConfig  # noqa: E402

QUANT_ROWS = [(8, 8), (4, 4)]          # fake and integer twins
INT_ONLY = [(4, 8)]                    # integer twins only


@dataclass
class Workload:
    """One network call of the family's sampler: x [rows, ...], t [rows], cond (keyword tensors), `rows` network
    rows per image (2 under guidance); `sample(model, n)` draws n images end to end (returns seconds)."""
    name: str
    net: nn.Module
    schedule: list[int]
    x: torch.Tensor
    t: torch.Tensor
    cond: dict = field(default_factory=dict)
    rows_per_image: int = 1
    sample: Callable[[Callable, int], float] | None = None

    @property
    def images(self) -> int:
        return self.x.shape[0] // self.rows_per_image


def ms_per_image(model, x, t, repeats: int, warmup: int, autocast: torch.dtype | None = None,
                 rows_per_image: int = 1, **cond) -> float:
    device = x.device
    amp = torch.autocast(device.type, dtype=autocast) if autocast else nullcontext()

    def call():
        with amp:
            model(x, t, **cond)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        for _ in range(warmup):
            call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / (x.shape[0] // rows_per_image)


def workload(cfg, batch: int, device: torch.device, steps: int = 100) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(schedule, x, t) of a DDIM config: a `steps`-step quad schedule, a seeded batch of noise at one timestep of
    it (a sampling step: the whole batch shares its timestep)."""
    from ddim import timestep_sequence
    gen = torch.Generator().manual_seed(0)
    schedule = timestep_sequence(cfg.diffusion.num_diffusion_timesteps, steps, "quad")
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=gen).to(device)
    t = torch.full((batch,), schedule[len(schedule) // 2], device=device)
    return schedule, x, t


def ddim_workload(config: str, random_weights: bool, ckpt: str | None, batch: int, steps: int,
                  device: torch.device) -> Workload:
    from ddim import UNet, load_config, make_betas
    from ddim.checkpoint import load_unet
    from ddim.sampling import make_sampler
    from diffusion.sampling import initial_noise
    cfg = load_config(config)
    net = (UNet(cfg.model) if random_weights else load_unet(cfg, ckpt)).to(device).eval()
    sampler = make_sampler(make_betas(cfg.diffusion), steps, "quad", 0.0)
    schedule, x, t = workload(cfg, batch, device, steps)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)

    def sample(model, n: int) -> float:
        noise = initial_noise(n, shape, 0)
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, batch):
                sampler(model, noise[i:i + batch].to(device))
        return time.perf_counter() - start
    return Workload(cfg.name, net, schedule, x, t, sample=sample)


def ldm_workload(config: str, random_weights: bool, ckpt: str | None, batch: int, steps: int,
                 device: torch.device, scale: float = 3.0) -> Workload:
    """The UNet of an LDM config under guidance: rows cat([uncond, cond]) of `batch` images, class labels in turn
    (ClassEmbedder) or a fixed prompt (CLIP)."""
    from ldm.checkpoint import load_model_from_config
    from diffusion.samplers import make_sampler
    from tools.tiny_ldm import random_weights as randomize
    from ldm.util import instantiate_from_config, load_config
    config_dict = load_config(config)
    ldm = (randomize(instantiate_from_config(config_dict["model"])) if random_weights else
           load_model_from_config(config_dict, ckpt)).to(device).eval()
    sampler = make_sampler("ddim", steps, ldm.alphas_cumprod)
    gen = torch.Generator().manual_seed(0)
    c, u = _conditioning(ldm, batch, device)
    size = ldm.image_size
    x = torch.randn(batch, ldm.channels, size, size, generator=gen).to(device)
    t = torch.full((2 * batch,), int(sampler.timesteps[len(sampler.timesteps) // 2]), device=device)
    cond = {} if c is None else {"context": torch.cat([u, c])}

    def sample(model, n: int) -> float:
        noise = torch.randn(n, ldm.channels, size, size, generator=torch.Generator().manual_seed(1))
        fp_unet = ldm.model.diffusion_model
        ldm.model.diffusion_model = model
        start = time.perf_counter()
        try:
            with torch.no_grad():
                for i in range(0, n, batch):
                    cc, uu = _conditioning(ldm, min(batch, n - i), device)
                    ldm.decode_first_stage(sampler.sample(ldm.apply_model, noise[i:i + batch].to(device), cc, uu, scale))
        finally:
            ldm.model.diffusion_model = fp_unet
        return time.perf_counter() - start
    return Workload(Path(config).stem, ldm.model.diffusion_model, list(sampler.timesteps), torch.cat([x, x]), t, cond,
                    rows_per_image=2 if cond else 1, sample=sample)


@torch.no_grad()
def _conditioning(ldm, n: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    encoder = getattr(ldm, "cond_stage_model", None)
    if encoder is None:
        return None, None
    if type(encoder).__name__ == "ClassEmbedder":
        labels = torch.arange(n, device=device) % (encoder.embedding.num_embeddings - 1)
        null = torch.full_like(labels, encoder.embedding.num_embeddings - 1)
        return (ldm.get_learned_conditioning({ldm.cond_stage_key: labels}),
                ldm.get_learned_conditioning({ldm.cond_stage_key: null}))
    return ldm.get_learned_conditioning(["a photograph"] * n), ldm.get_learned_conditioning([""] * n)


def quantized_twin(fp, bits: int, x, t, schedule, a_bits: int | None = None, cond: dict | None = None) -> QuantModel:
    """A TPQ model (W`bits`A`a_bits`) calibrated on the first input row at each timestep of the schedule (every
    slot needs samples; only the speed is measured)."""
    q = QuantModel(fp, QuantConfig(weight_bit=bits, act_bit=a_bits or bits, temporal=True), schedule)
    steps = torch.unique(torch.tensor(schedule))
    rows = {k: v[:1].cpu().expand(len(steps), *v.shape[1:]).contiguous() for k, v in (cond or {}).items()}
    calib = CalibSet(x[:1].cpu().expand(len(steps), *x.shape[1:]).contiguous(), steps, rows)
    return calibrate(q, calib, batch_size=len(x))


def rows(w: Workload, args) -> tuple[list[tuple[str, Callable[[], float]]], dict]:
    """((label, timing thunk) of every mode this device supports, the quantized twins by (w, a) bits)."""
    def timed(model, autocast=None):
        return lambda: ms_per_image(model, w.x, w.t, args.repeats, args.warmup, autocast, w.rows_per_image, **w.cond)
    out = [("FP32", timed(w.net))]
    amp = [torch.bfloat16] if w.x.device.type == "cpu" else [torch.float16, torch.bfloat16]
    out += [(f"FP32 + autocast {str(d).removeprefix('torch.')}", timed(w.net, d)) for d in amp]
    twins = {}
    for wb, ab in QUANT_ROWS + INT_ONLY:
        twins[(wb, ab)] = quantized_twin(w.net, wb, w.x, w.t, w.schedule, ab, w.cond)
    for wb, ab in QUANT_ROWS:
        q = twins[(wb, ab)]
        out.append((f"fake-quant W{wb}A{ab} TPQ", lambda q=q: _frozen(q, timed(q))))
        if args.compile:
            out.append((f"fake-quant W{wb}A{ab} TPQ, compiled", lambda q=q, c=torch.compile(q): _frozen(q, timed(c))))
    for wb, ab in QUANT_ROWS + INT_ONLY:
        out.append((f"int W{wb}A{ab} TPQ", timed(convert(twins[(wb, ab)]))))
    if args.compile:
        out.append(("FP32, compiled", timed(torch.compile(w.net))))
    return out, twins


def _frozen(q: QuantModel, thunk) -> float:
    with frozen(q):
        return thunk()


def sampling_seconds(w: Workload, twins: dict, n: int) -> dict[str, float]:
    """End-to-end seconds to sample n images: FP32, fake W4A4 and integer W4A4 (the same sampler and noise)."""
    q = twins[(4, 4)]
    out = {"FP32": w.sample(w.net, n)}
    with frozen(q):
        out["fake-quant W4A4 TPQ"] = w.sample(q, n)
    out["int W4A4 TPQ"] = w.sample(convert(q), n)
    return out


def sizes_on_disk(w: Workload, twins: dict) -> list[dict]:
    """Bytes of the files: the FP32 network's state_dict, and each twin's quantized.pt and packed file."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        torch.save(w.net.state_dict(), folder / "fp32.ckpt")
        out = [{"file": "FP32 checkpoint (state_dict)", "bytes": (folder / "fp32.ckpt").stat().st_size}]
        for (wb, ab), q in sorted(twins.items(), reverse=True):
            if ab != wb:
                continue
            save_quantized(folder / f"w{wb}.pt", q, f"twin W{wb}A{ab}")
            save_int(folder / f"w{wb}.int", convert(q, compiled=False), {"method": f"twin W{wb}A{ab}"})
            out += [{"file": f"quantized.pt W{wb}A{ab} (simulation)", "bytes": (folder / f"w{wb}.pt").stat().st_size},
                    {"file": f"packed W{wb}A{ab} (int{'4 two per byte' if wb <= 4 else '8'})",
                     "bytes": (folder / f"w{wb}.int").stat().st_size}]
    for row in out:
        row["x_fp32"] = row["bytes"] / out[0]["bytes"]
    return out


def is_ldm_config(path: str) -> bool:
    raw = read_yaml(path, "--config", "a DDIM config (configs/*.yml) or an LDM one (configs/latent-diffusion/)")
    return isinstance(raw, dict) and "params" in (raw.get("model") or {})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist.yml", help="a DDIM config, or an LDM config (its UNet, guided)")
    p.add_argument("--ckpt", default=None, help="default: the config's shipped checkpoint")
    p.add_argument("--random_weights", action="store_true", help="random weights (speed only; e.g. cifar10.yml)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch", type=int, default=100, help="images per network call (an LDM's guided call has 2 rows "
                                                          "per image)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 100 for DDIM, 20 for an LDM)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="time every row this many times, in rotation; report "
                   "medians (a noisy machine drifts between rows)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd FP and fake-quant models")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="also time sampling N images end to end")
    p.add_argument("--sizes", action="store_true", help="also measure the checkpoint sizes on disk")
    p.add_argument("--out", default=None, help="write the tables as JSON here")
    args = p.parse_args(argv)
    for flag in ("rounds", "batch", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)} is out of range: use >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    ldm = is_ldm_config(args.config)
    build = ldm_workload if ldm else ddim_workload
    w = build(args.config, args.random_weights, args.ckpt, args.batch, args.steps or (20 if ldm else 100), device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{w.name} UNet ({sum(p.numel() for p in w.net.parameters()) / 1e6:.2f} M params), {w.images} images per "
          f"call ({w.x.shape[0]} rows{', guided' if w.rows_per_image == 2 else ''}), {where}, torch {torch.__version__}")
    thunks, twins = rows(w, args)
    times = {label: [] for label, _ in thunks}
    for r in range(args.rounds):                     # rows in rotation: each round's ratios share its machine state
        fp_ms = None
        for label, thunk in thunks:
            ms = thunk()
            fp_ms = fp_ms or ms
            times[label].append((ms, ms / fp_ms))
            print(f"  {label:<34} {ms:8.4f} ms/img  {ms / fp_ms:5.2f}x FP32"
                  + (f"  (round {r + 1}/{args.rounds})" if args.rounds > 1 else ""), flush=True)
    table = [{"mode": label, "ms_per_image": statistics.median(ms for ms, _ in v),
              "x_fp32": statistics.median(ratio for _, ratio in v), "rounds": [ms for ms, _ in v]}
             for label, v in times.items()]
    if args.rounds > 1:
        print(f"median over {args.rounds} rounds (ratio: median of each round's ratio to that round's FP32):")
        for row in table:
            print(f"  {row['mode']:<34} {row['ms_per_image']:8.4f} ms/img  {row['x_fp32']:5.2f}x FP32")
    report = {"config": args.config, "network": w.name, "images_per_call": w.images, "guided": w.rows_per_image == 2,
              "device": where, "torch": torch.__version__, "repeats": args.repeats, "rounds": args.rounds,
              "rows": table, "int_note": "4-bit operands run on int8 units with values in the 4-bit range"}
    if args.sample:
        report["sampling"] = {"images": args.sample, "steps": len(w.schedule),
                              "seconds": sampling_seconds(w, twins, args.sample)}
        for label, s in report["sampling"]["seconds"].items():
            print(f"  sampling {args.sample} images: {label:<22} {s:8.1f} s", flush=True)
    if args.sizes:
        report["sizes"] = sizes_on_disk(w, twins)
        for row in report["sizes"]:
            print(f"  {row['file']:<36} {row['bytes']:>13,} B  {row['x_fp32']:.3f}x FP32")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
