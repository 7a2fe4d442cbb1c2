"""Command-line entry points: argument parsing, then library calls."""
