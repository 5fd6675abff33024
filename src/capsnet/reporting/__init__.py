"""From records to results: the table beside the paper's, learning curves, the report, and
the figures of a trained model.

Reads run dirs (metrics.json, history.csv, checkpoints' figures) through capsnet.run's
record formats, never the CLI; draws with matplotlib.  May import capsnet.nn and
capsnet.data; the figures module imports nothing of capsnet.run.
"""
