"""FractalGen: train, tune, evaluate and register Fractal Generative Models at cluster scale.

Subpackages:
- ``fractalgen.models``: FractalAR / FractalMAR (levels, pixel head, recursion, sampling, sizes,
  released checkpoints).
- ``fractalgen.pipelines``: images -> ADM crop -> MDS shards -> object storage -> streaming loader.
- ``fractalgen.platform``: Ray Train + DeepSpeed training, evaluation, Tune sweeps, MLflow registry, CLI.
"""

__version__ = "0.1.0"
