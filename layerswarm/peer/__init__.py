"""The peer daemon: choose a span, load it, serve sessions, announce, report health."""
