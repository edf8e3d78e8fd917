"""Data: where rows come from (`sources`), how they become tokens (`formats`), verifiable tasks (`tasks`)."""
