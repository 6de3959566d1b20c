"""Task pipelines behind the scripts: load -> calibrate/quantize -> sample -> evaluate."""
