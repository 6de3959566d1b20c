"""What every model family shares for sampling: the samplers (diffusion.samplers), CompVis's timestep grids
(diffusion.schedule) and the batch-by-batch image pipeline with its files (diffusion.sampling). It imports no
model package; ddim and ldm both build on it."""
