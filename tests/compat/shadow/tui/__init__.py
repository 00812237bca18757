"""The user's own package named `tui`."""

OWNER = "user tui package"
