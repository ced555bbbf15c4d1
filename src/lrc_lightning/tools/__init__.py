"""Tools (the guide "From a config: the reference models and the CLI"): the
``lrc-lightning`` command (:mod:`.cli`; ``lrc_lightning.cli:main``) and its ``preview`` of
slices and super-pixels (:mod:`.preview`). The top chapter: it may import every other
one."""
