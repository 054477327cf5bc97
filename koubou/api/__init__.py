"""The HTTP API (Flask): thin; validates, writes the pending row, sends the task, reads state."""
