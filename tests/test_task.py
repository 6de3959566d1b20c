from pathlib import Path

import pytest

from common.errors import UsageError
from conftest import ROOT
from experiments.ddim_task import build_parser
from experiments.task import load_task, run_argv

TASKS = sorted((ROOT / "configs" / "tasks").glob("*.yml"))


@pytest.mark.parametrize("path", TASKS, ids=[p.stem for p in TASKS])
def test_every_run_of_every_task_parses(path):
    from experiments.task import pipeline
    task = load_task(path, None)
    module, script = pipeline(task)
    assert script.is_file()
    for name in task["runs"]:
        args = module.build_parser().parse_args(run_argv(task, name, Path("runs"), []))
        quantized = "quant_mode" in (task["common"] | (task["runs"][name] or {}))
        assert args.ptq == quantized
        assert (getattr(args, "logdir", None) or args.outdir) == str(Path("runs") / name)


def test_ablation_rows_are_quantized_with_their_switches():
    task = load_task(ROOT / "configs" / "tasks" / "mnist_ablation.yml", None)
    args = build_parser().parse_args(run_argv(task, "tpq", Path("runs"), []))
    assert args.ptq and args.quant_act and args.act_bit == 4 and (args.wd, args.tpq, args.bkd) == (False, True, False)


def test_quick_preset_and_bad_names():
    task = load_task(ROOT / "configs" / "tasks" / "mnist.yml", "quick")
    assert list(task["runs"]) == ["fp", "baseline_w4a4", "dilatequant_w4a4"]
    with pytest.raises(UsageError, match="unknown preset"):
        load_task(ROOT / "configs" / "tasks" / "mnist.yml", "nope")


def test_report_keeps_archived_runs(tmp_path):
    import json

    import numpy as np

    from experiments.report import write_report

    def run(root, name, fid):
        d = root / name
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"method": "fp", "fid": fid}))
        np.savez(d / "samples.npz", arr_0=np.zeros((20, 8, 8, 1), np.uint8))

    out = tmp_path / "results" / "t.md"
    out.parent.mkdir()
    run(tmp_path / "day1", "fp", 3.0)
    write_report(tmp_path / "day1", out, "t")
    run(tmp_path / "day2", "other", 5.0)          # day1's run directory is gone by now
    text = write_report(tmp_path / "day2", out, "t").read_text()
    assert "| fp |" in text and "| other |" in text and "3.00" in text
    assert np.load(tmp_path / "results" / "t_runs" / "fp.npz")["arr_0"].shape == (16, 8, 8, 1)
    assert (tmp_path / "results" / "t.png").exists()
    record = {"method": "fp", "fid": 3.0, "source": "copied from the main table"}
    (tmp_path / "results" / "t_runs" / "fp.json").write_text(json.dumps(record))
    assert "fp: copied from the main table" in write_report(tmp_path / "day2", out, "t").read_text()


def test_report_psnr_to_fp_pairs_only_matching_runs(tmp_path):
    import json

    import numpy as np

    from experiments.report import write_report

    rng = np.random.default_rng(0)
    fp_images = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)

    def run(name, record, images):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"n_samples": len(images), "steps": 10, "seed": 1} | record))
        np.savez(d / "samples.npz", arr_0=images)

    noisy = np.clip(fp_images.astype(int) + 4, 0, 255).astype(np.uint8)   # every pixel off by <= 4
    run("fp", {"method": "fp"}, fp_images)
    run("q", {"method": "baseline"}, noisy)
    run("q_other_steps", {"method": "baseline", "steps": 20}, noisy)
    run("q_other_seed", {"method": "baseline", "seed": 2}, noisy)
    write_report(tmp_path / "runs", tmp_path / "t.md", "t")
    records = {n: json.loads((tmp_path / "t_runs" / f"{n}.json").read_text()) for n in ("fp", "q", "q_other_steps", "q_other_seed")}
    expected = float(np.median(10 * np.log10(255.0 ** 2 / ((noisy.astype(float) - fp_images) ** 2)
                                             .reshape(12, -1).mean(1))))
    assert records["q"]["psnr_to_fp_db"] == pytest.approx(expected) and records["q"]["psnr_ref"] == "fp"
    assert 35 < expected < 60
    assert all("psnr_to_fp_db" not in records[n] for n in ("fp", "q_other_steps", "q_other_seed"))
    assert "PSNR to FP dB" in (tmp_path / "t.md").read_text()
