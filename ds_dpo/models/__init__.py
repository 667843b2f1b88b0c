"""What a model family supports, and the DeepSpeed engines built from it."""
