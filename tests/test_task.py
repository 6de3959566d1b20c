from pathlib import Path

import pytest

from conftest import ROOT
from experiments.ddim_task import build_parser
from experiments.task import load_task, run_argv

TASKS = sorted((ROOT / "configs" / "tasks").glob("*.yml"))


@pytest.mark.parametrize("path", TASKS, ids=[p.stem for p in TASKS])
def test_every_run_of_every_task_parses(path):
    task = load_task(path, None)
    for name in task["runs"]:
        args = build_parser().parse_args(run_argv(task, name, Path("runs"), []))
        quantized = "quant_mode" in (task["common"] | (task["runs"][name] or {}))
        assert args.ptq == quantized
        assert args.logdir == str(Path("runs") / name)


def test_ablation_rows_are_quantized_with_their_switches():
    task = load_task(ROOT / "configs" / "tasks" / "mnist_ablation.yml", None)
    args = build_parser().parse_args(run_argv(task, "tpq", Path("runs"), []))
    assert args.ptq and args.quant_act and args.act_bit == 4 and (args.wd, args.tpq, args.bkd) == (False, True, False)


def test_quick_preset_and_bad_names():
    task = load_task(ROOT / "configs" / "tasks" / "mnist.yml", "quick")
    assert list(task["runs"]) == ["fp", "baseline_w4a4", "dilatequant_w4a4"]
    with pytest.raises(SystemExit, match="unknown preset"):
        load_task(ROOT / "configs" / "tasks" / "mnist.yml", "nope")
