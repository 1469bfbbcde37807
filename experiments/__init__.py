"""Experiment-side code for jlora: data builders, reference models, diffusion helpers.

Nothing here is part of the library API; it exists so the experiments and
their tests can share one definition of each dataset and model.
"""
