"""Adding LRC to your code (the guides "Add LRC with the mixin" and "... with the
callback"): :class:`~lrc_lightning.LRCMixin` for a LightningModule you write
(:mod:`.mixin`), :class:`~lrc_lightning.LRCCallback` for one you do not (:mod:`.callback`),
and the listing of a network's dense layers that tells either which layer to use
(:mod:`.layers`)."""
