"""Generation at any resolution: which images (`plan`), how to integrate (`options`), the packed
sampling loop (`generate`), pictures and grids (`pictures`), FID (`fid`), a whole run written
to a folder (`run`), the `fitscale sample` command (`cli`) and the demo's closing grid (`demo`).

Images of different sizes share each forward pass: a batch is a packed sequence, like in
training. Every image's noise comes from a generator seeded by (seed, image index), so an image
is the same whichever batch or rank computes it.

Nothing is imported here, so `fitscale --help` stays fast: import from the submodules.
"""
