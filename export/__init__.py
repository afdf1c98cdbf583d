"""Export and serving: SavedModel for TF Serving, a gRPC client, a local PredictionService for development."""
