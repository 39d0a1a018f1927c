"""caprese.export: filled in by its own issue."""
