"""The production-shaped local deployment: PostgreSQL, Redis, Celery workers, two triggerers, S3 (make cluster, make test-system)."""
