"""Calibration and benchmark data the project ships, and their generators."""
