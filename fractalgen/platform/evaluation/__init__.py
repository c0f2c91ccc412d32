"""Evaluation of FractalGen models: bits/dim, FID / Inception Score / precision / recall.

- ``inception``: the FID Inception v3 network and where its weights come from (never downloaded).
- ``metrics``: Fréchet distance, Inception Score, k-NN precision/recall, reference ``.npz`` files.
- ``data``: passes over prepared shard sets (bits/dim, reference statistics).
- ``learning``: did a run learn (own-class colour share of the samples, bits/dim), its figures.

Generating the images to score is ``fractalgen.platform.generation``'s job (above this package);
the ``fractalgen eval`` command is ``fractalgen.cli.eval``.
"""
