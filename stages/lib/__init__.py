"""Modules shared by the stages: one concern each (params, data, splits, models, ...)."""
