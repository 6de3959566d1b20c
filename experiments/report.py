"""Gather <runs>/*/results.json into a markdown table and a sample-grid figure (FP vs methods).

Every run's record and its first GRID_N samples are archived next to the table, in <table>_runs/<run>.json
and .npz, and the table and figure are drawn from that archive: runs done on another day (or machine) stay in
the table after their run directory is gone. Each row names the commit of the code that made it (the
record's provenance; `archived_in <commit>` for rows made before provenance was recorded), and rows of
different method versions (quant.METHOD_VERSION) are refused in one table unless asked for.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.files import write_json
from common.errors import UsageError
from diffusion.sampling import make_grid
from evaluation.fidelity import paired_psnr_db

COLUMNS = [("run", "{}"), ("method", "{}"), ("W/A", "{}"), ("FID", "{:.2f}"), ("sFID", "{:.2f}"),
           ("FID to FP", "{:.2f}"), ("PSNR to FP dB", "{:.2f}"), ("IS", "{:.2f}"),
           ("calib s", "{:.0f}"), ("peak MB", "{:.0f}"), ("sampling s", "{:.0f}"), ("n", "{}"), ("steps", "{}"),
           ("commit", "{}")]


def _bits(r: dict) -> str:
    if r.get("method") == "fp":
        return "32/32"
    return f"{r.get('weight_bit')}/{r.get('act_bit') or 32}"


def commit_of(r: dict) -> str | None:
    """The commit of the code that made a record: its provenance, or (older rows) the commit that archived it."""
    prov = r.get("provenance") or {}
    if prov.get("commit"):
        return prov["commit"][:7] + ("+dirty" if prov.get("dirty") else "")
    return f"archived in {r['archived_in']}" if r.get("archived_in") else None


def row(name: str, r: dict) -> list[str]:
    values = [name, r.get("method"), _bits(r), r.get("fid"), r.get("sfid"), r.get("fid_to_fp"), r.get("psnr_to_fp_db"),
              r.get("is"),
              r.get("calib_seconds"), r.get("peak_mem_mb"), r.get("sampling_seconds"), r.get("n_samples"),
              r.get("steps"), commit_of(r)]
    return ["n/a" if v is None else fmt.format(v) for v, (_, fmt) in zip(values, COLUMNS)]


GRID_N = 16


def read_record(path: Path) -> dict:
    """A results.json as a dict; a damaged one is one UsageError line naming it."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a readable results.json ({type(e).__name__}: {e})",
                         "rerun that run, or move it out of the folder") from None
    if not isinstance(record, dict):
        raise UsageError(f"{path} is not a run record (a JSON object)", "rerun that run, or move it out of the folder")
    return record


def collect(runs: Path) -> list[tuple[str, dict]]:
    return [(p.parent.name, read_record(p)) for p in sorted(runs.glob("*/results.json"))]


def model_of(r: dict) -> str:
    """What network a record's samples came from: its config's name (records made before the config was
    recorded: 'n/a')."""
    return Path(r["config"]).stem if r.get("config") else "n/a"


def label_models(results: list[tuple[str, dict]]) -> dict[str, str]:
    """run -> its model label: the config's name, with the checkpoint's digest where one config appears with
    several checkpoints."""
    ckpts: dict[str, set] = {}
    for _, r in results:
        ckpts.setdefault(model_of(r), set()).add((r.get("inputs") or {}).get("ckpt"))
    return {n: model_of(r) + (f" @{str((r.get('inputs') or {}).get('ckpt'))[:8]}" if len(ckpts[model_of(r)]) > 1
                              else "") for n, r in results}


PAIRING = ("n_samples", "steps", "skip_type", "eta", "seed", "config", "sampler", "scale")


def add_psnr_to_fp(runs: Path, results: list[tuple[str, dict]]) -> None:
    """Give each quantized run `psnr_to_fp_db`: the median over images of the PSNR between its sample and the FP
    run's sample from the same noise, where an FP run with the same count, steps, sampler and seed is in `runs`."""
    fps = [(n, r) for n, r in results if r.get("method") == "fp" and (runs / n / "samples.npz").exists()]
    for name, record in results:
        ref = next((n for n, r in fps if all(r.get(k) == record.get(k) for k in PAIRING)), None)
        if record.get("method") == "fp" or ref is None or not (runs / name / "samples.npz").exists():
            continue
        if record.get("fp_samples"):                            # the run paired itself (--fp_samples)
            continue
        psnr = paired_psnr_db(np.load(runs / ref / "samples.npz")["arr_0"], np.load(runs / name / "samples.npz")["arr_0"])
        record["psnr_to_fp_db"], record["psnr_ref"] = float(np.median(psnr)), ref


def archive_runs(runs: Path, archive: Path) -> list[tuple[str, dict]]:
    """Copy each run's results.json (and first GRID_N samples) into `archive`; -> every archived record."""
    archive.mkdir(parents=True, exist_ok=True)
    results = collect(runs)
    add_psnr_to_fp(runs, results)
    for name, record in results:
        write_json(archive / f"{name}.json", record)
        samples = runs / name / "samples.npz"
        if samples.exists():
            np.savez_compressed(archive / f"{name}.npz", arr_0=np.load(samples)["arr_0"][:GRID_N])
    return [(p.stem, read_record(p)) for p in sorted(archive.glob("*.json"))]


def markdown(results: list[tuple[str, dict]], title: str) -> str:
    """The table; rows of more than one model (config, or checkpoint of one config) get a model column, rows of
    one model name it under the title."""
    models = label_models(results)
    several = len(set(models.values())) > 1

    def line(cells: list[str], model: str) -> str:                 # the model column goes after the run's name
        return "| " + " | ".join(cells[:1] + [model] * several + cells[1:]) + " |"
    head = line([c for c, _ in COLUMNS], "model")
    sep = "|" + "---|" * (len(COLUMNS) + several)
    body = [line(row(n, r), models[n]) for n, r in results]
    model_line = [] if several or not results else [f"Model: {next(iter(models.values()))}.", ""]
    note = ("FID to FP: FID against the FP model's own samples from the same noise (runs given --fp_samples). "
            "PSNR to FP: median over images of the PSNR between a run's sample and the FP run's sample from the same "
            "noise (what quantization keeps; n/a where no paired FP run was in the same run folder). "
            "IS is n/a: it needs the real Inception classifier head, which no package here ships. "
            "peak MB: CUDA peak allocation, or on CPU the process's peak resident memory at the end of calibration.")
    sources = [f"{n}: {r['source']}" for n, r in results if r.get("source")]   # rows not run by this task
    return "\n".join([f"## {title}", "", *model_line, head, sep, *body, "", *sources, note, ""])


def grid_figure(archive: Path, names: list[str], out: Path) -> None:
    """One labelled grid of the archived first samples per run (same seeds: image i starts from the same noise)."""
    cols = []
    for name in names:
        path = archive / f"{name}.npz"
        if not path.exists():
            continue
        g = make_grid(np.load(path)["arr_0"][:GRID_N]).convert("RGB")
        canvas = Image.new("RGB", (max(g.width, 8 * len(name)), g.height + 14), "white")
        canvas.paste(g, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), name, fill="black")
        cols.append(canvas)
    if cols:
        fig = Image.new("RGB", (sum(c.width + 6 for c in cols), max(c.height for c in cols)), "white")
        x = 0
        for c in cols:
            fig.paste(c, (x, 0))
            x += c.width + 6
        fig.save(out)


def check_versions(results: list[tuple[str, dict]], allow_mixed: bool) -> None:
    """One table, one method version (quant.METHOD_VERSION), unless mixing is asked for."""
    versions = {}
    for name, r in results:
        versions.setdefault(r.get("method_version"), []).append(name)
    if len(versions) > 1 and not allow_mixed:
        parts = "; ".join(f"version {v}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                          for v, names in versions.items())
        raise UsageError(f"the table would mix rows of different method versions ({parts})",
                         "rerun the old rows with the current code, or pass --allow_mixed_versions")


def write_report(runs: Path | None, out: Path, title: str, only: list[str] | None = None,
                 allow_mixed: bool = False, archive: Path | None = None) -> Path:
    """<out>.md and .png from the archive (default <out>_runs/), after adding the runs in `runs` (if given);
    `only`: the runs to show (default: every archived run)."""
    archive = archive or out.with_name(out.stem + "_runs")
    results = archive_runs(runs, archive) if runs is not None else \
        [(p.stem, read_record(p)) for p in sorted(archive.glob("*.json"))]
    if only is not None:
        missing = sorted(set(only) - {n for n, _ in results})
        if missing:
            raise UsageError(f"no archived run {missing} in {archive}")
        results = [(n, r) for n, r in results if n in only]
    check_versions(results, allow_mixed)
    results = sorted(results, key=lambda nr: nr[1].get("method") != "fp")   # FP rows first
    out.write_text(markdown(results, title))
    grid_figure(archive, [n for n, _ in results], out.with_suffix(".png"))
    return out
