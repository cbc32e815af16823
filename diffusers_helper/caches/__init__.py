"""Step caches: reuse the transformer blocks' output on steps where it barely changes."""
