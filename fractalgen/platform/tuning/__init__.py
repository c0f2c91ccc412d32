"""Tuning: ``sweep`` runs a Ray Tune search over sampling settings (guidance, temperature, schedule,
iterations) scored by FID, writes its table and plot, and records the best settings on a registered
version. It sits above generation, evaluation and the registry, which it drives."""
