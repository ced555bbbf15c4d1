"""Does LRC help on *your* data? The label-efficiency protocol and its statistics.

``lrc-lightning benchmark --data DATASET ...`` (:mod:`.label_efficiency`) pre-trains each
arm, reads it out by fine-tuning and by a frozen linear probe on k labelled patients, and
reports paired differences with standard errors and bootstrap intervals
(:mod:`.statistics`). Watching representation quality during pre-training: the online
segmentation probe (:mod:`.probe`, documented as ``lrc_lightning.probe``) and images and
tables for any logger (:mod:`.image_logging`). Imports the models and everything below them.
"""
