"""The LRC objective (the concept "The loss and its options"): super-pixel maps at feature
resolution and region embeddings (:mod:`.regions`), the Localized Region Contrast loss
(:mod:`.loss`), the dense projection head (:mod:`.heads`), the weight schedule
(:mod:`.schedules`), the term with its one declaration of the options,
:class:`~lrc_lightning.LRCConfig` (:mod:`.term`), and the batch formats that say where a
batch holds the views and maps (:mod:`.batches`). Nothing here imports Lightning."""
