"""Export and serving: SavedModel for TF Serving, a gRPC client, a local PredictionService for development."""

import os as _os

#: TF Serving's example configuration files, shipped with the package: ``models.config`` and
#: ``batching_parameters.txt`` in this directory (``export/`` in a checkout).
SERVER_CONFIGS = _os.path.dirname(_os.path.abspath(__file__))
