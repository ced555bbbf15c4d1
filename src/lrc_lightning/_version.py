"""The package version, in a module of its own so that any module can read it without
importing the package's façade (``lrc_lightning/__init__.py``), and setuptools can read it
without importing anything (``setup.cfg``: ``version = attr: ...``)."""

__version__ = "0.3.0"
