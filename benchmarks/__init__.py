"""
Benchmarks of airflow-provider-hpc against the local emulator: ``python -m benchmarks``.

Sections (see ``docs/benchmarks.md``):

- ``load``: many triggers in one asyncio loop, as the triggerer runs them, beside a bare aiohttp
  floor and Airflow's own ``HttpSensorTrigger``;
- ``mix``: Muse and Rescale triggers together in one loop, beside the floor;
- ``transfer``: one large result streamed by the hook, beside ``curl -o``;
- ``harvest``: many Rescale output files, default concurrency beside concurrency 1;
- ``economy``: state requests per job and the delay to the event, default backoff beside a fixed
  interval, on time scaled down.

The emulator always runs in its own process, bound to 127.0.0.1, so its CPU is never counted.
"""
