"""The profilerd terminal UI (Textual): a live view over the daemon's /api/v1."""
