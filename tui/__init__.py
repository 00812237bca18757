"""The profilerd terminal UI (Textual): a view over snapshots from the daemon's /api/v1, a
recording, or Prometheus. See docs/tui.md.

Nothing is imported here, so `import tui` stays cheap and Textual loads only when the app is
built (``tui.app.make_app``); ``profilerd`` itself imports this package lazily, never at start.
"""
