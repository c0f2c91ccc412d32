"""The Ray / DeepSpeed / MLflow side of FractalGen: training, evaluation, sweeps, registry and the CLI."""
