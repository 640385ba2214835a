"""Sensors of the HPC provider."""
