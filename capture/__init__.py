"""Capture files and v1 framing, with no I/O framework: Core's record format, the
per-connection writer and clock, peer folder naming, and a sans-IO frame decoder."""
