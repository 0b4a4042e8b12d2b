"""Bottom-layer helpers shared by every package: atomic file writes, dotted-name resolution in a module tree,
include/exclude name globs. They import only the standard library, torch and compressor.errors."""
