"""The Ray / DeepSpeed / MLflow side of FractalGen, in layers (each imports only those below it):
``tuning`` (sweeps) > ``cluster`` (planning) > ``training`` > ``registry`` > ``generation`` >
``evaluation`` > ``artifacts`` (checkpoints, the registry client) > ``ray_connect``. The commands are
in ``fractalgen.cli``; the layers are checked by ``lint-imports`` (pyproject ``[tool.importlinter]``)."""
