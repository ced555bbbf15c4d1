"""Does LRC help on *your* data? The label-efficiency protocol and its statistics.

``lrc-lightning benchmark --data DATASET ...`` (:mod:`.label_efficiency`) pre-trains each
arm, reads it out by fine-tuning and by a frozen linear probe on k labelled patients, and
reports paired differences with standard errors and bootstrap intervals
(:mod:`.statistics`).
"""
