"""Airflow plugins of the provider: the "HPC runs" view (``runs_view.py``) and what it reads (``runs.py``)."""
