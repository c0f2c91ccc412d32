"""Tuning: Ray Tune sweeps over sampling settings scored by FID. ``config`` is the recipe
(``SweepConfig``) and its checks, ``space`` the search space (grid, Optuna's conditional space, the
released baseline, ASHA), ``trial`` one trial (generate, score per rung, report), ``results`` the
table, Pareto fronts, plots and summary, and ``sweep`` the driver that runs them and records the
best setting on a registered version. It sits above generation, evaluation and the registry."""
