"""Everything MLflow: the store, runs, logged models, the Model Registry and run lineage.

The library's one owner of MLflow; `team/` only adds what a server needs (logins, the
release-gate plugin, webhooks)."""
