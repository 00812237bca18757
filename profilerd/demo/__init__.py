"""The workload behind `profilerd demo`."""
