"""Everything MLflow: the store, runs, logged models, the Model Registry and run lineage.

This is the only package that imports `mlflow`."""
