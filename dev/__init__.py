"""
What the tests, the benchmarks and the soak share, kept out of the provider's and the emulator's wheels.

- ``airflow_stack.py``: a private Airflow deployment (API server, scheduler with LocalExecutor,
  triggerer) on loopback, for the crash tests, the worker-cost benchmark and the soak;
- ``soak/``: the fault soak (``make soak``, ``scripts/soak.py``), its fault plan and its DAG.
"""
