"""What operators see of a running worker: its HTTP endpoint (metrics, probes, the status
page) and the status document shared with `streamsink status --json`. (Logs: streamsink.logs.)

Above the four packages, beside the demo, below the CLI (checked by `make lint`): it reads
the worker's state, never the other way round (the worker only notes each window in a
`consumers.telemetry.Telemetry`).
"""
