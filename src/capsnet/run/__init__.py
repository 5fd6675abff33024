"""One job, from a composed config to its run dir: the LightningModule, training, evaluation,
the run dir's owner (lock, atomic writes), records, signatures, history, tracking,
callbacks, signals, sweeps.

May import capsnet.nn, capsnet.data and capsnet.reporting.figures (a trained model's
figures), Lightning and Hydra.  Nothing else of capsnet imports it, except reporting's
readers of the record formats it defines (record, signature, history, rundir).
"""
