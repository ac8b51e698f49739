"""Signals of monitoring (docs/architecture.md, "Continuous benchmarks").

- `benchmark_recorded(sender=BenchmarkRun, run=...)`: a node's benchmark result came back and is
  stored: `run.state` is `done` (its `results` hold one row per workload) or `failed` (the agent
  reported an error, or what it sent was not a benchmark suite; `run.reason` says which). Sent
  once per run, inside the heartbeat's transaction, after the rows are written; runs that time
  out or are skipped by the schedule send nothing. Receivers (the alert rules) must not raise: a
  failing receiver is logged and the heartbeat goes on.
"""

from django.dispatch import Signal

benchmark_recorded = Signal()
