"""How an export stops early: its caller's `should_stop()` said so (the export was
cancelled), and the step under way gave up, leaving nothing it could not clean up."""


class ExportStopped(Exception):
    """should_stop() asked for a stop: the step was abandoned (a child process killed)."""
