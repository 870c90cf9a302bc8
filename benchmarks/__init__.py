"""Benchmarks. Throughput harness: timing (protocol), modes (registry), steps (runners), report (CSV and tables),
env (device facts), run (CLI). study.py is the separate DIGITS accuracy study.
"""
