"""toolshed."""
