"""OpenAI's ADM evaluation suite (FID, sFID, Inception Score, precision, recall) in PyTorch.

`adm` holds the metrics exactly as guided-diffusion's evaluations/evaluator.py computes them,
`inception` the Inception-v3 features of ADM's TensorFlow graph (torch-fidelity's port, local
weights), `batches` the sample batches read in slices, `features` their features in resumable parts
over ranks, `reference` ADM reference batches (stored statistics; building our own), `evaluate` one
evaluation, `paper` the paper's tables, `cli` the commands. docs/evaluation.md.
"""
