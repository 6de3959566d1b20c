"""The evaluation protocol (SPEC §6): FID/sFID against real images, IS when it can be real, fidelity to FP."""
