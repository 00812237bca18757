"""What the daemon takes in, as records: probe ingest, host and processes, GPUs, live verdicts,
ended runs. Each sampler returns its records and ``sinks`` writes them to the store and the
recording; ``loop`` runs a sampler on fixed deadlines."""
