"""Ladder-Residual decode under tensor parallelism: the benchmark (`bench`), its run-by-run
report (`runs_report`), and readers of compiled schedules and profiler traces."""
