"""Phase 3, deployment: export to ONNX/TorchScript/OpenVINO, inference engines, benchmark."""
