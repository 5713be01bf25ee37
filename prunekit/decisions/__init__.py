"""Pruning decisions, written once over the op contract: selection and the tie rule, schedules,
plans, spectra (``spectrum``, ``spectrum_tracking``), channel groups and their FLOPs, FLOPs
counting and pruning-at-initialisation (PAI) scores.
"""
