"""Read-only views of the store: Prometheus metrics and the JSON API."""
