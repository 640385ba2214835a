"""
HTTP to the HPC services, knowing nothing of Airflow: retries, errors, sync and async sessions, paging.

Sync (:mod:`.sync`, ``requests``) serves workers; async (:mod:`.aio`, ``aiohttp``) serves triggers.
Both use the same :class:`~.retry.RetryPolicy` and the same rules for what may be tried again:

- idempotent requests (GET, and POSTs the caller marks idempotent) retry on connection errors,
  timeouts, 429 (waiting ``Retry-After``, capped) and 500/502/503/504, with exponential backoff
  and jitter, a bounded number of attempts, and one log line per retry saying why;
- requests that create work retry only when the request surely never reached the server
  (the TCP/TLS connection could not be opened);
- any other 4xx fails at once with the server's message.

The hooks read an Airflow connection into :class:`~.base.TransportSettings`; nothing here imports
``airflow``, so the rules can be read, tested and changed without it.
"""
