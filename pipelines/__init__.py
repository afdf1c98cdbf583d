"""Preprocessing pipelines: raw logs (parquet, MMCTR layout) -> TFRecords + item table + feature spec."""
