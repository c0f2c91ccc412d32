"""Artifacts: what runs leave behind and where models are kept, the lowest platform layer.
``run_plan`` holds the worker plan and the model it builds (saved with every checkpoint);
``checkpoints`` finds, reads and consolidates DeepSpeed checkpoints and exports them in the released
format; ``model_store`` is the MLflow registry as a store of model files (client, ``models:/`` URIs,
versions) plus ``use_tracking_uri``. Nothing here samples, trains or registers."""
