"""Measuring layers and choosing which to remove: streaming statistics over calibration text,
selection strategies, plots."""
