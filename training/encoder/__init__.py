"""What reward and moderation models share: an encoder classifier's training loop, scoring, ONNX export and publishing."""
