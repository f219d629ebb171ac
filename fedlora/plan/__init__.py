"""``fedlora-plan``: a job's memory and traffic, planned from the model's shape alone.

:mod:`~fedlora.plan.presets` (config values of common LLMs), :mod:`~fedlora.plan.shape` (a model's
config and its weightless build on the meta device), :mod:`~fedlora.plan.memory` (bytes per client
and per pass), :mod:`~fedlora.plan.traffic` (bytes per client per round, by the simulator's own
accounting), :mod:`~fedlora.plan.cli` (the command).
"""
