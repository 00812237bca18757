"""Analysis: windows of steps -> features -> rules -> a verdict with evidence."""
