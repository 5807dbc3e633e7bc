"""The team stack: PostgreSQL, an MLflow tracking server on it and a DVC remote, started on
one machine with one command, for checkouts on every machine to share."""
