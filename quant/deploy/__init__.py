"""Deploy: a calibrated (simulated) model becomes integer layers that compute the same function.

Simulate and deploy are two steps. `quant.model.QuantModel` is the model of the quantized function that
calibration and distillation train (fake quantization in floating point); `convert` turns it into an `IntModel`
whose convolutions, linear layers and attention matmuls take integer operands on integer kernels of maintained
libraries (oneDNN's uint8 x int8 convolution and linear on the CPU, `torch._int_mm` elsewhere and for the
matmuls), accumulate in int32 and rescale once per output channel. `save_int` / `load_int` write and read it as
a packed safetensors file (int8, or int4 two per byte) that loads without the calibration machinery.

    from quant.deploy import convert, save_int, load_int
    int_model = convert(qmodel)              # same call: int_model(x, t, **cond)
    save_int("unet_w4a4.int", int_model, header={...})
"""
from quant.deploy.model import IntModel, convert  # noqa: F401
from quant.deploy.file import load_int, read_header, save_int  # noqa: F401
