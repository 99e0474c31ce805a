"""Image input and output: bounded reading, listing, atomic writes, datasets."""
