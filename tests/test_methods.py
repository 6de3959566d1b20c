"""Methods as registered, typed configs (quant.methods): the built-in ones, and one registered from outside the
package (tests/data/minmax_method.py) run through the DDIM sampling script with its own option."""
import json

import pytest
import torch

from common.errors import UsageError
from conftest import ROOT, run
from experiments.ddim_task import build_parser
from experiments.flags import load_method_plugin, method_config, method_name
from quant.distill import BKDTraining, DistillConfig
from quant.methods import MethodContext, method_type, methods, quantize, register_method
from quant.methods.baseline import BaselineConfig
from quant.methods.dilatequant import DilateQuantConfig
from quant.methods.qdiff import QDiffConfig
from quant.settings import QuantConfig

PLUGIN = str(ROOT / "tests" / "data" / "minmax_method.py")
W8A8 = ["--ptq", "--weight_bit", "8", "--quant_act", "--act_bit", "8", "--cali_n", "16", "--no_fid"]


def test_the_built_in_methods_are_registered_by_name_with_their_config_types():
    known = methods()
    assert list(known)[:3] == ["baseline", "qdiff", "dilatequant"]
    assert (known["baseline"], known["qdiff"], known["dilatequant"]) == (BaselineConfig, QDiffConfig, DilateQuantConfig)
    with pytest.raises(ValueError, match="unknown quantization method 'nope'"):
        method_type("nope")


def test_a_config_without_a_handler_and_a_taken_name_are_errors(tiny_unet):
    class Unregistered:
        name = "dilatequant"
    with pytest.raises(TypeError, match="no quantization method is registered for .*Unregistered"):
        quantize(tiny_unet, QuantConfig(), Unregistered(), MethodContext([], None, ROOT))
    with pytest.raises(ValueError, match="a method named 'dilatequant' is registered already"):
        register_method(Unregistered, lambda *a: None)


def test_the_identity_is_structured_and_the_label_short():
    dq = DilateQuantConfig(distill=DistillConfig(training=BKDTraining.STAGED, fp_input=0.5))
    identity = dq.identity()
    assert identity["name"] == "dilatequant" and identity["scaling"] == "wd"
    assert identity["distill"]["training"] == "staged" and identity["distill"]["fp_input"] == 0.5
    assert dq.label() == "dilatequant+staged+fpin0.5"
    assert DilateQuantConfig(temporal=False, distillation=False).label() == "dilatequant[wd]"
    assert DilateQuantConfig(scaling=None).label() == "dilatequant[tpq,bkd]" and not DilateQuantConfig(scaling=None).weight_dilation
    assert QDiffConfig(fp_input=1.0).label() == "qdiff+fpin1" and QDiffConfig().identity()["cache_dtype"] is None
    json.dumps(identity)                                                  # fields, ready for results.json


def test_flags_build_the_same_configs_as_the_dataclass_defaults():
    args = build_parser().parse_args(["--config", "c.yml", "-l", "x", "--ptq", "--quant_mode", "dilatequant"])
    assert method_config(args) == DilateQuantConfig(distill=DistillConfig(seed=args.seed))
    args.quant_mode = "qdiff"
    cfg = method_config(args)
    assert (cfg.act_iters, cfg.act_lr, cfg.lp) == (QDiffConfig.act_iters, QDiffConfig.act_lr, QDiffConfig.lp)
    assert method_name(args) == "qdiff"


def test_help_groups_the_options_by_method():
    text = build_parser().format_help()
    for name in ("baseline", "qdiff", "dilatequant"):
        assert f"--quant_mode {name}:" in text
    dq = text.split("--quant_mode dilatequant:")[1]
    assert "--bkd_training" in dq and "Also: --cali_iters" in dq


def test_a_method_registered_from_outside_runs_through_the_sampling_script(tiny_task, tmp_path):
    rec = run(tiny_task, tmp_path / "minmax", *W8A8, "--method_plugin", PLUGIN, "--quant_mode", "minmax")
    assert rec["method"] == "minmax" and rec["method_identity"]["name"] == "minmax"
    assert rec["method_identity"]["per_timestep"] is True and rec["act_bit"] == 8
    saved = torch.load(tmp_path / "minmax" / "quantized.pt", weights_only=False)
    assert saved["config"]["temporal"] is True and saved["meta"]["method_identity"]["per_timestep"] is True
    assert len(saved["schedule"]) > 1                                     # one range per sampled timestep
    shared = run(tiny_task, tmp_path / "shared", *W8A8, "--method_plugin", PLUGIN, "--quant_mode", "minmax",
                 "--no-minmax_per_timestep")                              # its own option
    assert shared["method"] == "minmax[shared]"
    assert torch.load(tmp_path / "shared" / "quantized.pt", weights_only=False)["config"]["temporal"] is False
    again = run(tiny_task, tmp_path / "reload", *W8A8, "--method_plugin", PLUGIN, "--quant_mode", "minmax",
                "--cali_ckpt", str(tmp_path / "minmax" / "quantized.pt"))
    assert again["quantized_from"]["method"] == "minmax"


def test_a_missing_plugin_file_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="--method_plugin .*nope.py: no such file"):
        load_method_plugin(["--method_plugin", str(tmp_path / "nope.py")])


def test_an_option_of_another_method_is_refused_not_ignored(tiny_task, tmp_path):
    with pytest.raises(UsageError, match="--bkd_training staged is a setting of dilatequant, not of qdiff"):
        run(tiny_task, tmp_path / "x", *W8A8, "--quant_mode", "qdiff", "--bkd_training", "staged")
    assert not (tmp_path / "x").exists()
