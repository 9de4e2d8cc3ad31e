"""The training data: image folders and the built-in shapes, validated, bucketed, captioned and cached."""
