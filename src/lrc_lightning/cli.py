"""The ``lrc-lightning`` command: the documented import path of
:mod:`lrc_lightning.tools.cli` (``python -m lrc_lightning.cli``; the console script
``lrc_lightning.tools.cli:main``)."""

from lrc_lightning.tools.cli import *  # noqa: F403
from lrc_lightning.tools.cli import __all__, main  # noqa: F401

if __name__ == "__main__":
    import sys

    sys.exit(main())
