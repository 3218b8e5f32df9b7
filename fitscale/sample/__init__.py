"""Generation at any resolution: which images (`plan`), how to integrate (`options`), the packed
sampling loop (`generate`), pictures and grids (`pictures`), FID (`fid`), a whole run written
to a folder (`run`), the `fitscale sample` command (`cli`) and the demo's closing grid (`demo`).

Images of different sizes share each forward pass: a batch is a packed sequence, like in
training. Every image's noise (its start, and each SDE step's) comes from a generator seeded by
(seed, step, image index), and adaptive ODE solvers pick each image's steps from its own error
(fitscale.flow.per_image), so an image is the same whichever batch or rank computes it.

Nothing is imported here, so `fitscale --help` stays fast: import from the submodules.
"""
