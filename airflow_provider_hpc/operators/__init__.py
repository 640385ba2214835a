"""Operators of the HPC provider."""
