"""ocifuse: read OCI image archives in place — mount, fsck and inspect without extracting."""

from __future__ import annotations

from .layout import ArchiveLayout, DirectoryLayout, Layout, open_layout

__all__ = ["ArchiveLayout", "DirectoryLayout", "Layout", "open_layout"]
__version__ = "0.1.0"
