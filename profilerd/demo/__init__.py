"""The workload behind `profilerd demo`."""

# Long enough for a confident verdict (~300 steps), short enough for a first try.
DEMO_SECONDS = 8.0
