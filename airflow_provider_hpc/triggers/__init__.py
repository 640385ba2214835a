"""Triggers of the HPC provider."""
