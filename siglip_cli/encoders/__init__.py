"""Ways to run the image tower besides eager torch (see model.Encoder for the interface they plug into)."""
