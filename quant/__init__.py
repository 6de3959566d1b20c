"""The quantization core: quantizers and TPQ, wrapping models from outside, calibration, Weight Dilation,
distillation, and the methods built from them."""

# Version of what the methods compute. Bump it when a change alters the numbers that calibration, distillation
# or quantized sampling produce (not their speed or their records); every results.json records it, and
# tools/results_table.py refuses to put rows of different versions in one table unless asked.
#   1: the code of commits 583624c (2026-11-25) and later.
METHOD_VERSION = 1
