"""Command-line entry points: `caprese` (a click group) and `caprese-export`."""
