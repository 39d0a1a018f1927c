"""caprese.calibration: filled in by its own issue."""
