"""agmm-deploy: sparse-label semantic segmentation (AGMM) from training to ONNX/TensorRT to BentoML serving."""

__version__ = "0.1.0"
