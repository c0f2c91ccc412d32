"""Generation: turning a model into images. ``sources`` resolves a model source (a registered
version, a released-format file, a training checkpoint folder) to a local file; ``settings`` holds
``SamplingSettings``, the one sampling-settings type (tags, flags, sweep results); ``sampling`` runs
seeded batched generation, alone or spread over Ray workers with Inception features (PNG grids:
``fractalgen.platform.images``); ``serving`` is the MLflow pyfunc model a registered version serves.
Below it: evaluation (Inception network) and artifacts (checkpoint export, the registry client)."""
