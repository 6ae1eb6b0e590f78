"""Compatibility layers for users of other attribution packages.

- :mod:`fasttrak.compat.trak`: a drop-in for the reference ``traker`` package (import name
  ``trak``): ``from fasttrak.compat.trak import TRAKer`` instead of ``from trak import
  TRAKer``, with the same arguments, methods, save directory semantics and score
  orientation, computed by fasttrak's store and estimator (docs/migrating_from_trak.md).
"""
