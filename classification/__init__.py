"""Image classification with the Bag of Tricks training recipe."""
