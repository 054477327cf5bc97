"""The SQL mirror's tables and sessions. Only the API (pending rows) and the mirror write."""
