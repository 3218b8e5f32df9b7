"""Helpers shared by the test lanes (tests/README.md): `train_runs` starts and reads small training runs
of `train_worker.py`, a worker that trains the tiny model on seeded synthetic steps; `eval_batches`
makes small picture batches and runs `fitscale` commands for the evaluation tests. Imported as
`helpers.train_runs` (pyproject.toml puts tests/ on pytest's path)."""
