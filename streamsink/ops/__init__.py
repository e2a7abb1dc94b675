"""What operators see of a running worker: its HTTP endpoint (metrics, probes, the status
page), the status document shared with `streamsink status --json`, and its log setup.

Above the four packages, beside the CLI: it reads the worker's state, never the other way
round (the worker only notes each window in a `consumers.telemetry.Telemetry`).
"""
