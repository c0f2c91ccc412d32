"""Training: ``driver`` plans a run from a recipe and launches it on Ray Train; ``worker`` is the loop
each Ray worker runs, over its parts ``train_step`` (forward, backward, step, loss reduction),
``metrics_logger`` (progress, MLflow), ``evaluator`` (sample grids, bits/dim) and ``checkpointer``
(checkpoints, pruning, resumes); ``engine`` sets up DeepSpeed (optimizer, ZeRO stage, learning-rate
schedule); ``deepspeed_compat`` holds what we do to DeepSpeed beyond its public API (patches, a
private function); ``finetune`` loads and checks pretrained weights and freezes levels; ``tracking``
logs runs to MLflow. It builds on evaluation (bits/dim), generation (model sources for fine-tuning) and
artifacts (the plan and checkpoint formats)."""
