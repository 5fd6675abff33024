"""From records to results: the table beside the paper's, learning curves, the report, and
the figures of a trained model.

Reads run dirs (metrics.json, history.csv, checkpoints' figures) through capsnet.run's
record formats (record, signature, history, rundir; tracking for W&B's online/offline rule),
never the CLI or the training code; draws with matplotlib.  May import capsnet.nn and
capsnet.data (each dataset's own facts); the figures module imports nothing of capsnet.run.
"""
