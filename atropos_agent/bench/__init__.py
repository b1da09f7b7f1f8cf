"""``atropos-tool-executor bench``: load an executor service with concurrent trajectories and
read its throughput and latency beside baselines measured in the same run.

- ``mix``: which calls a trajectory makes, and what a right answer holds
- ``targets``: where calls go: the executor's routes, or a sandbox server's own
- ``load``: one concurrency level: trajectories making calls back to back, timed
- ``spawn_loop``: the machine's limit, a plain ``bash -c`` spawn loop, one worker per core
- ``local_service``: an executor (and baseline sandboxes) started for the run, then stopped
- ``report``: the figures of a run as documented JSON (docs/benchmarks.md)
- ``render`` and ``plot``: the same figures as terminal tables and as a PNG
- ``progress``: a live progress bar per phase
- ``command``: the command line, and the order of the phases

Nothing here is imported by the services: it is a client of them.
"""
