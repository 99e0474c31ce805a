"""Image input and output: headers, bounded reading, listing, tf.train.Example, atomic writes,
datasets."""
