"""The adapter contract (quant.adapters.check_adapter): every name an adapter returns exists in the network and is
of the kind its role needs, or one AdapterError line names it, before anything is wrapped; a matmul wrapper keeps
the wrapped module's own op."""
import pytest
import torch
import torch.nn as nn

from common.errors import AdapterError
from quant.adapters import adapter_for, check_adapter
from quant.layers import QuantMatMul
from quant.model import QuantModel
from quant.settings import QuantConfig


class Misnamed:
    """The tiny DDIM UNet's own adapter with one entry replaced."""

    def __init__(self, base, **replaced):
        self.base, self.replaced = base, replaced

    def __getattr__(self, role):
        if role in self.replaced:
            value = self.replaced[role]
            return lambda model: value(self.base, model) if callable(value) else value
        return getattr(self.base, role)


def _first_unit(base, model):
    return ["conv_in_typo"] + base.units(model)[1:]


CASES = {
    "a unit that does not exist": (dict(units=_first_unit), "names unit 'conv_in_typo'"),
    "a unit inside another": (dict(units=lambda b, m: b.units(m) + ["down.0.block.0.conv1"]), "with a unit inside"),
    "no units": (dict(units=[]), "no distillation units"),
    "a first layer that does not exist": (dict(edge_layers=("conv_first", "conv_out")), "edge layer 'conv_first'"),
    "a last layer that is not a weight layer": (dict(edge_layers=("conv_in", "norm_out")), "a GroupNorm, not a"),
    "a split layer that does not exist": (dict(split_channels={"up.0.block.0.conv_1": 8}),
                                          "split layer 'up.0.block.0.conv_1'"),
    "a split outside the layer's channels": (
        dict(split_channels=lambda b, m: {k: 10_000 for k in list(b.split_channels(m))[:1]}), "input channels"),
    "a matmul that does not exist": (dict(softmax_operands={"mid.attn_1.qkv": None}),
                                     "attention matmul 'mid.attn_1.qkv'"),
    "a matmul that is a weight layer": (dict(softmax_operands={"mid.attn_1.q": None}), "not a parameter-free"),
    "a softmax operand out of range": (
        dict(softmax_operands=lambda b, m: {k: 2 for k in list(b.softmax_operands(m))[:1]}), "softmax operand 2"),
    "a shared group with a missing layer": (dict(shared_inputs=[("mid.attn_1.q", "mid.attn_1.kk")]),
                                            "shared-input layer 'mid.attn_1.kk'"),
    "a norm producer that does not exist": (dict(norm_producers={("mid.attn_1.q",): "mid.attn_1.nrm"}),
                                            "norm producer 'mid.attn_1.nrm'"),
    "a norm producer that is not a norm": (dict(norm_producers={("mid.attn_1.q",): "mid.attn_1.k"}),
                                           "a Conv2d, not a GroupNorm"),
    "a head layout of another kind": (dict(head_layout="b h"), "head layout 'b h'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_misnamed_entry_is_a_one_line_error(case, tiny_unet):
    replaced, message = CASES[case]
    adapter = Misnamed(adapter_for(tiny_unet), **replaced)
    with pytest.raises(AdapterError, match=message) as err:
        check_adapter(tiny_unet, adapter)
    assert "\n" not in str(err.value)


def test_the_repo_adapters_pass_and_a_missing_declaration_is_named(tiny_unet):
    check_adapter(tiny_unet, adapter_for(tiny_unet))

    class NoLayout:
        def __getattr__(self, role):
            if role == "head_layout":
                raise AttributeError(role)
            return getattr(adapter_for(tiny_unet), role)
    with pytest.raises(AdapterError, match="lacks head_layout"):
        check_adapter(tiny_unet, NoLayout())


def test_quant_model_checks_before_wrapping(tiny_unet, monkeypatch):
    """A misnamed first layer used to leave the real first layer at the inner bit width, silently."""
    import quant.model
    bad = Misnamed(adapter_for(tiny_unet), edge_layers=("input_conv", "conv_out"))
    monkeypatch.setattr(quant.model, "adapter_for", lambda model: bad)
    with pytest.raises(AdapterError, match="edge layer 'input_conv'"):
        QuantModel(tiny_unet, QuantConfig(weight_bit=4, act_bit=4))


def test_a_matmul_wrapper_keeps_the_wrapped_op(tiny_unet):
    class ScaledMatMul(nn.Module):
        def forward(self, a, b):
            return 2 * torch.bmm(a, b)

    for name, module in tiny_unet.named_modules():
        if name.endswith(".qk"):
            parent, _, leaf = name.rpartition(".")
            setattr(tiny_unet.get_submodule(parent), leaf, ScaledMatMul())
    q = QuantModel(tiny_unet, QuantConfig(weight_bit=8, act_bit=8))
    matmuls = [m for n, m in q.model.named_modules() if isinstance(m, QuantMatMul) and n.endswith(".qk")]
    assert matmuls and all(isinstance(m.op, ScaledMatMul) for m in matmuls)
    m = matmuls[0]
    m.quant_act = False
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    torch.testing.assert_close(m(a, b), 2 * torch.bmm(a, b))
