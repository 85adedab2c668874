"""Benchmarks that write their numbers, card and command under benchmarks/."""
