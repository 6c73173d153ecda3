"""Where the teacher signal comes from: a live model (more sources to come: cache, server)."""
