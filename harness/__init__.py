"""What tests and benchmarks start and drive: the real servers, and the Nomad double.

- ``servers``: sandbox servers and executor services as real processes on loopback, each in a
  directory of its own that is removed when it stops; free ports; waiting for health.
- ``processes``: what runs on this host (to check that nothing outlived a server).
- ``nomad_double``: an in-process Nomad agent speaking the documented HTTP API, which runs
  sandboxes as local processes the way ``raw_exec`` does (see its README).

Not part of the product: the wheel ships ``atropos_agent`` only.
"""
