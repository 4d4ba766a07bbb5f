"""cafs: a FUSE-mounted, content-addressed store for pipeline artifacts."""

__version__ = "0.1.0"
