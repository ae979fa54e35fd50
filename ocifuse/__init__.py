"""ocifuse: read OCI image archives in place — mount, fsck and inspect without extracting."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy reads it as True)
if TYPE_CHECKING:
    from typing import Any

    from .layout import ArchiveLayout, DirectoryLayout, Layout
    from .views import ViewOptions, open_layout, open_rootfs

__all__ = ["ArchiveLayout", "DirectoryLayout", "Layout", "ViewOptions", "open_layout", "open_rootfs"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The public API, imported on first use (PEP 562): ``ocifuse umount`` never loads the read core."""
    if name in __all__:
        from . import layout, views

        return getattr(views if hasattr(views, name) else layout, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
