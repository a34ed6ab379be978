"""Speed measurements (`dgemma bench`). Nothing in the package imports this."""
