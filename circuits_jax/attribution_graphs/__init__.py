"""attribution_graphs."""
