"""Sessions: ingest (upsert by id) and the list/get surface (seed 001).

requests -> store -> rows, composed by service; ingest writes batches and streams."""
